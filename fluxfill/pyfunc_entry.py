"""The entry point MLflow loads a registered fluxfill model from ("models from code": no pickled object)."""

import mlflow

from fluxfill.registry import FluxfillModel

mlflow.models.set_model(FluxfillModel())
