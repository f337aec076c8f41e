"""Settings for the whole test suite."""

import os

# MLflow 3 sends usage telemetry unless told not to; tests run offline.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
