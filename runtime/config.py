"""The runtime's settings: one frozen dataclass read from the environment at start.

    RUNTIME_HOST (127.0.0.1)        RUNTIME_PORT (8090)         RUNTIME_WORKERS (1)
    RUNTIME_SERVICE_TOKEN (required, at least 16 characters)
    RUNTIME_RUN_TIMEOUT_S (120)     RUNTIME_FLOWS_DIR (.stack/runtime/flows)
    RUNTIME_LLM_BASE_URL (http://127.0.0.1:8091/v1)  RUNTIME_LLM_API_KEY (sk-mock)
    RUNTIME_LOG_LEVEL (warning)
    RUNTIME_VECTORS_DATABASE_URL (unset: flows cannot read training documents)
    RUNTIME_EMBEDDINGS_URL (RUNTIME_LLM_BASE_URL)  RUNTIME_EMBEDDINGS_API_KEY (RUNTIME_LLM_API_KEY)
    RUNTIME_EMBEDDINGS_MODEL (text-embedding-mock; the model the CMP embeds documents with)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

MIN_TOKEN_LENGTH = 16
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# The names flows use for the model endpoint, as Langflow global variables (load_from_db
# fields). Their values come from this config, so a flow never carries a URL or a secret.
LLM_BASE_URL_VARIABLE = "SITEKIT_LLM_BASE_URL"
LLM_API_KEY_VARIABLE = "SITEKIT_LLM_API_KEY"
CREDENTIAL_VARIABLES = frozenset({LLM_BASE_URL_VARIABLE, LLM_API_KEY_VARIABLE})


class ConfigError(ValueError):
    """A setting the runtime cannot start with; the message names the variable."""


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    service_token: str
    host: str = "127.0.0.1"
    port: int = 8090
    workers: int = 1
    run_timeout_s: float = 120.0
    flows_dir: Path = Path(".stack/runtime/flows")
    llm_base_url: str = "http://127.0.0.1:8091/v1"
    llm_api_key: str = "sk-mock"
    log_level: str = "warning"
    vectors_database_url: str = ""
    embeddings_url: str = ""
    embeddings_api_key: str = ""
    embeddings_model: str = "text-embedding-mock"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RuntimeConfig:
        env = os.environ if env is None else env
        token = env.get("RUNTIME_SERVICE_TOKEN", "")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                "RUNTIME_SERVICE_TOKEN is required and must be at least "
                f"{MIN_TOKEN_LENGTH} characters"
            )
        default = cls(service_token=token)
        llm_base_url = (env.get("RUNTIME_LLM_BASE_URL") or default.llm_base_url).rstrip("/")
        llm_api_key = env.get("RUNTIME_LLM_API_KEY") or default.llm_api_key
        config = cls(
            service_token=token,
            host=env.get("RUNTIME_HOST") or default.host,
            port=_integer(env, "RUNTIME_PORT", default.port, 1, 65535),
            workers=_integer(env, "RUNTIME_WORKERS", default.workers, 1, 64),
            run_timeout_s=_seconds(env, "RUNTIME_RUN_TIMEOUT_S", default.run_timeout_s),
            flows_dir=Path(env.get("RUNTIME_FLOWS_DIR") or default.flows_dir),
            llm_base_url=llm_base_url,
            llm_api_key=llm_api_key,
            log_level=(env.get("RUNTIME_LOG_LEVEL") or default.log_level).lower(),
            vectors_database_url=env.get("RUNTIME_VECTORS_DATABASE_URL") or "",
            embeddings_url=(env.get("RUNTIME_EMBEDDINGS_URL") or llm_base_url).rstrip("/"),
            embeddings_api_key=env.get("RUNTIME_EMBEDDINGS_API_KEY") or llm_api_key,
            embeddings_model=env.get("RUNTIME_EMBEDDINGS_MODEL") or default.embeddings_model,
        )
        url = urlsplit(config.llm_base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(
                f"RUNTIME_LLM_BASE_URL must be an http(s) URL, got {config.llm_base_url!r}"
            )
        if config.vectors_database_url and urlsplit(config.vectors_database_url).scheme not in (
            "postgres", "postgresql"
        ):
            raise ConfigError("RUNTIME_VECTORS_DATABASE_URL must be a postgresql:// URL")
        if config.log_level not in LOG_LEVELS:
            raise ConfigError(f"RUNTIME_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
        return config

    @property
    def llm_host(self) -> str:
        return urlsplit(self.llm_base_url).hostname or ""

    def credential_variables(self) -> dict[str, str]:
        """The global variables that point the flows' model components at the configured LLM."""
        return {LLM_BASE_URL_VARIABLE: self.llm_base_url, LLM_API_KEY_VARIABLE: self.llm_api_key}

    def engine_environment(self) -> dict[str, str]:
        """lfx reads its egress policy from the environment; this is what it must see.

        The configured LLM host is the one the operator sanctions: it may be loopback (SSRF
        allowlist) and may receive the runtime's key (credential allowlist, `http://` when
        the URL is cleartext, which lfx otherwise refuses for a credential).
        """
        url = urlsplit(self.llm_base_url)
        host = url.hostname or ""
        netloc = f"{host}:{url.port}" if url.port else host
        credential_host = f"http://{netloc}" if url.scheme == "http" else netloc
        return {
            "LANGFLOW_SSRF_ALLOWED_HOSTS": host,
            "LANGFLOW_PROVIDER_CREDENTIAL_ALLOWED_HOSTS": credential_host,
        }

    @staticmethod
    def engine_defaults() -> dict[str, str]:
        """Engine settings the runtime changes unless the operator set them.

        langchain-openai bounds the wait for each stream chunk with `asyncio.wait_for`, one
        task per token; the runtime bounds the whole run instead (RUNTIME_RUN_TIMEOUT_S).
        lfx renders errors as rich tracebacks by default, seconds of CPU for one failed run;
        JSON lines carry the same traceback.
        """
        return {"LANGCHAIN_OPENAI_STREAM_CHUNK_TIMEOUT_S": "0", "LANGFLOW_PRETTY_LOGS": "false"}


def apply_engine_environment(config: RuntimeConfig, environ: MutableMapping[str, str]) -> None:
    """Add the configured LLM host to lfx's allowlists, keeping what the operator set."""
    for name, value in config.engine_defaults().items():
        environ.setdefault(name, value)
    for name, value in config.engine_environment().items():
        entries = [e.strip() for e in environ.get(name, "").split(",") if e.strip()]
        if value not in entries:
            environ[name] = ",".join([*entries, value])


def _integer(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from exc
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value
