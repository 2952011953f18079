"""The Lightning side: datamodule, LightningModule, callbacks, trainer, one fit, precision
and threads; it never talks to MLflow.

Imports fitscope.core, fitscope.data and fitscope.model; never fitscope.tracking.
"""
