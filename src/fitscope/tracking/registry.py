"""The MLflow model registry: a run's model as a registered version with an alias."""

from __future__ import annotations

from fitscope.tracking.store import global_store


def register_version(
    client,
    name: str,
    model_uri: str,
    run_id: str,
    alias: str,
    tags: dict[str, str],
    description: str,
    model_description: str,
) -> str:
    """Register ``model_uri`` as a new version of ``name``, point ``alias`` at it.

    The version carries ``tags`` and ``description``; the registered model gets
    ``model_description`` when it is created. Returns the version number.
    """
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, description=model_description)
    # A tracking server only accepts a logged model's `models:/<model_id>` source when the
    # request names that model id too (a local store infers it).
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    # A local store looks the logged model up through MLflow's global URI: make it this one.
    with global_store(client.tracking_uri):
        version = client.create_model_version(
            name, model_uri, run_id=run_id, tags=tags, description=description, model_id=model_id
        )
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)
