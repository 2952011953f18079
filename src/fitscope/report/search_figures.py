"""The search report's figures, drawn by Optuna's own plots
(``optuna.visualization.matplotlib``) from the search's stored study: the optimization
history (against the other sampler's study when it exists), parameter importances
(fANOVA), the learning rate x weight decay contour and the per-epoch intermediate values.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from fitscope.results.figures import pyplot, save_png

CONTOUR_PARAMS = ("optimizer.lr", "regularization.l2")

FIGURES = {
    "optimization_history.png": "the best objective so far after each trial",
    "param_importances.png": "how much of the objective's variance each parameter explains "
    "(fANOVA)",
    "contour.png": "the objective over learning rate x weight decay (l2 = 0.5 x lambda): where "
    "the good region is",
    "intermediate_values.png": "validation accuracy per epoch of every trial, as reported to "
    "the pruner",
}


def _figure(axes: Any) -> Any:
    fig = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
    fig.set_size_inches(9, 5)  # room for the legend Optuna puts beside the axes
    return fig


def optuna_figures(study: Any, other: Any | None, out: Path) -> list[str]:
    """Draw the figures that ``study`` has data for into ``out``; their file names."""
    import optuna
    import optuna.visualization.matplotlib as plots
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.trial import TrialState

    pyplot()  # the non-interactive backend
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    drawn: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if complete:
            studies = [study, other] if other is not None else study
            drawn["optimization_history.png"] = plots.plot_optimization_history(studies)
        # Importances and the contour model how the objective varies: not when it does not.
        varied = len({t.value for t in complete}) > 1
        if varied and len(study.best_trial.params) >= 2:
            evaluator = FanovaImportanceEvaluator(seed=0)
            drawn["param_importances.png"] = plots.plot_param_importances(study, evaluator)
        if varied and set(CONTOUR_PARAMS) <= set(study.best_trial.params):
            drawn["contour.png"] = plots.plot_contour(study, params=list(CONTOUR_PARAMS))
        if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            axes = plots.plot_intermediate_values(study)
            if axes.get_legend() is not None:  # one entry per trial: unreadable past a few
                axes.get_legend().remove()
            drawn["intermediate_values.png"] = axes
    for name, axes in drawn.items():
        save_png(_figure(axes), out / name)
    return list(drawn)
