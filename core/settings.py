"""Application settings: the one place that reads the environment and `.env`.

Every setting here appears in `.env.example` with a comment. Names are a contract with
integrators; do not rename them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Namespace of every Redis key the app writes (``<prefix>:call:<sid>``, ...).
DEFAULT_REDIS_KEY_PREFIX = "voice_agent"
DEFAULT_PROFILE = REPO_ROOT / "core" / "dealership.example.toml"


class MissingSettingError(RuntimeError):
    """Raised when a feature needs a setting that is not configured.

    The message names the environment variable, so it can be shown to the operator as is.
    """


class Settings(BaseSettings):
    """Process-wide configuration read from the environment and `.env`."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # Storage. Unset means: start an embedded server under DATA_DIR.
    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    redis_url: str | None = Field(default=None, alias="REDIS_URL")
    data_dir: Path = Field(default=REPO_ROOT / ".data", alias="DATA_DIR")
    redis_key_prefix: str = Field(
        default=DEFAULT_REDIS_KEY_PREFIX, alias="REDIS_KEY_PREFIX", pattern=r"^[A-Za-z0-9_.:\-]+$"
    )

    # OpenAI
    openai_api_key: SecretStr | None = Field(default=None, alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(default=None, alias="OPENAI_BASE_URL")
    openai_model: str = Field(default="gpt-4o", alias="OPENAI_MODEL")

    # Deepgram
    deepgram_api_key: SecretStr | None = Field(default=None, alias="DEEPGRAM_API_KEY")
    deepgram_stt_url: str | None = Field(default=None, alias="DEEPGRAM_STT_URL")
    deepgram_tts_url: str | None = Field(default=None, alias="DEEPGRAM_TTS_URL")
    deepgram_stt_model: str = Field(default="nova-3", alias="DEEPGRAM_STT_MODEL")
    deepgram_tts_voice: str = Field(default="aura-2-asteria-en", alias="DEEPGRAM_TTS_VOICE")
    deepgram_tts_voice_es: str = Field(default="aura-2-celeste-es", alias="DEEPGRAM_TTS_VOICE_ES")

    # Twilio
    twilio_account_sid: str | None = Field(default=None, alias="TWILIO_ACCOUNT_SID")
    twilio_auth_token: SecretStr | None = Field(default=None, alias="TWILIO_AUTH_TOKEN")
    twilio_phone_number: str | None = Field(default=None, alias="TWILIO_PHONE_NUMBER")
    twilio_api_base_url: str | None = Field(default=None, alias="TWILIO_API_BASE_URL")
    public_base_url: str | None = Field(default=None, alias="PUBLIC_BASE_URL")
    # Texts go from this Messaging Service when set, else from TWILIO_PHONE_NUMBER.
    twilio_messaging_service_sid: str | None = Field(
        default=None, alias="TWILIO_MESSAGING_SERVICE_SID"
    )

    # Google Calendar (optional; the Postgres calendar is used when unset)
    google_client_id: str | None = Field(default=None, alias="GOOGLE_CLIENT_ID")
    google_client_secret: SecretStr | None = Field(default=None, alias="GOOGLE_CLIENT_SECRET")
    google_refresh_token: SecretStr | None = Field(default=None, alias="GOOGLE_REFRESH_TOKEN")
    google_calendar_id: str | None = Field(default=None, alias="GOOGLE_CALENDAR_ID")

    # Conversation tuning
    barge_in_min_words: int = Field(default=2, alias="BARGE_IN_MIN_WORDS", ge=1)
    barge_in_min_speech_secs: float | None = Field(default=None, alias="BARGE_IN_MIN_SPEECH_SECS")
    barge_in_max_backchannel_words: int = Field(
        default=3, alias="BARGE_IN_MAX_BACKCHANNEL_WORDS", ge=1
    )
    barge_in_protect_disclosure: bool = Field(default=True, alias="BARGE_IN_PROTECT_DISCLOSURE")
    turn_stop_on_answer: bool = Field(default=True, alias="TURN_STOP_ON_ANSWER")
    speculative_replies: bool = Field(default=False, alias="SPECULATIVE_REPLIES")
    snapshot_ttl_secs: int = Field(default=86400, alias="SNAPSHOT_TTL_SECS", ge=60)
    snapshot_transcript_turns: int = Field(default=6, alias="SNAPSHOT_TRANSCRIPT_TURNS", ge=0)

    # Failure handling
    llm_timeout_secs: float = Field(default=5.0, alias="LLM_TIMEOUT_SECS", gt=0, le=60)
    dead_air_hold_secs: float = Field(default=1.2, alias="DEAD_AIR_HOLD_SECS", ge=0, le=10)
    tool_acknowledgement: bool = Field(default=True, alias="TOOL_ACKNOWLEDGEMENT")
    db_timeout_secs: float = Field(default=1.0, alias="DB_TIMEOUT_SECS", gt=0, le=30)
    pending_writes_max_age_secs: float = Field(
        default=3600.0, alias="PENDING_WRITES_MAX_AGE_SECS", gt=0
    )

    # Dealership and server
    dealership_profile: Path = Field(default=DEFAULT_PROFILE, alias="DEALERSHIP_PROFILE")
    admin_token: SecretStr | None = Field(default=None, alias="ADMIN_TOKEN")

    # Ops console (/ops): sessions, login rate limit, cookie flags
    ops_session_ttl_secs: int = Field(default=8 * 3600, alias="OPS_SESSION_TTL_SECS", ge=300)
    ops_login_max_failures: int = Field(default=5, alias="OPS_LOGIN_MAX_FAILURES", ge=1)
    ops_login_lockout_secs: int = Field(default=900, alias="OPS_LOGIN_LOCKOUT_SECS", ge=60)
    # None: Secure cookies exactly when PUBLIC_BASE_URL is https.
    ops_cookie_secure: bool | None = Field(default=None, alias="OPS_COOKIE_SECURE")
    host: str = Field(default="127.0.0.1", alias="HOST")
    port: int = Field(default=8000, alias="PORT", ge=0, le=65535)
    log_level: str = Field(default="INFO", alias="LOG_LEVEL")
    # Log format: "text" for people, "json" (one object per line) for log shippers.
    log_format: Literal["text", "json"] = Field(default="text", alias="LOG_FORMAT")

    # Browser test page (developer tool; see api/webrtc.py)
    webrtc_dev: bool = Field(default=False, alias="WEBRTC_DEV")
    webrtc_dev_force: bool = Field(default=False, alias="WEBRTC_DEV_FORCE")
    # Scale-out and graceful drain (deploy/, README "Deploying")
    # Worker processes of `runner.py serve` behind its one port; 0 means one per CPU core
    # available to the process (its cgroup quota and CPU affinity count).
    workers: int = Field(default=0, alias="WORKERS", ge=0, le=256)
    # After SIGTERM: seconds between "not ready" (GET /ready answers 503) and refusing new
    # media streams, so the load balancer notices first.
    drain_grace_secs: float = Field(default=10.0, alias="DRAIN_GRACE_SECS", ge=0, le=3600)
    # After SIGTERM: how long live calls may go on before they are ended with a goodbye.
    drain_timeout_secs: float = Field(default=600.0, alias="DRAIN_TIMEOUT_SECS", ge=0, le=86400)
    # Campaign worker: seconds between passes, and between a standby's tries for the lock.
    campaign_poll_secs: float = Field(default=15.0, alias="CAMPAIGN_POLL_SECS", gt=0, le=300)

    @field_validator("log_level")
    @classmethod
    def _upper_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"LOG_LEVEL must be a log level name, got {value!r}")
        return level

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_log_format(cls, value: object) -> object:
        return (value.strip().lower() or "text") if isinstance(value, str) else value

    @field_validator(
        "database_url",
        "redis_url",
        "openai_base_url",
        "deepgram_stt_url",
        "deepgram_tts_url",
        "twilio_api_base_url",
        "public_base_url",
        "twilio_account_sid",
        "twilio_phone_number",
        "twilio_messaging_service_sid",
        "google_client_id",
        "google_calendar_id",
        "openai_api_key",
        "deepgram_api_key",
        "twilio_auth_token",
        "google_client_secret",
        "google_refresh_token",
        "admin_token",
        "barge_in_min_speech_secs",
        "ops_cookie_secure",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("webrtc_dev", "webrtc_dev_force", mode="before")
    @classmethod
    def _empty_is_false(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return False
        return value

    @field_validator("redis_key_prefix", mode="before")
    @classmethod
    def _prefix_without_colon(cls, value: object) -> object:
        # Keys are "<prefix>:call:<sid>": "voice_agent:" and "voice_agent" mean the same.
        if isinstance(value, str):
            return value.strip().rstrip(":") or DEFAULT_REDIS_KEY_PREFIX
        return value

    @field_validator("dealership_profile", mode="before")
    @classmethod
    def _default_profile(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return DEFAULT_PROFILE
        return value

    @property
    def google_calendar_enabled(self) -> bool:
        """Whether all four Google Calendar settings are present."""
        return all(
            (
                self.google_client_id,
                self.google_client_secret,
                self.google_refresh_token,
                self.google_calendar_id,
            )
        )

    @property
    def ops_cookie_is_secure(self) -> bool:
        """Whether the ops console's cookies carry the Secure flag."""
        if self.ops_cookie_secure is not None:
            return self.ops_cookie_secure
        return (self.public_base_url or "").lower().startswith("https://")

    def missing_call_settings(self) -> list[str]:
        """Names of the settings a phone call needs that are not set.

        Returns:
            Environment variable names, empty when calls can be taken.
        """
        required = {
            "OPENAI_API_KEY": self.openai_api_key,
            "DEEPGRAM_API_KEY": self.deepgram_api_key,
            "TWILIO_ACCOUNT_SID": self.twilio_account_sid,
            "TWILIO_AUTH_TOKEN": self.twilio_auth_token,
            "PUBLIC_BASE_URL": self.public_base_url,
        }
        return [name for name, value in required.items() if not value]

    def require(self, *names: str) -> None:
        """Raise a clear error naming every listed setting that is unset.

        Args:
            *names: Environment variable names, e.g. ``"OPENAI_API_KEY"``.

        Raises:
            MissingSettingError: One or more settings are not configured.
        """
        fields = {
            (field.alias or name).upper(): name for name, field in type(self).model_fields.items()
        }
        missing = [name for name in names if not getattr(self, fields[name.upper()])]
        if missing:
            raise MissingSettingError(
                "Missing configuration: "
                + ", ".join(missing)
                + ". Set it in the environment or in .env (see .env.example)."
            )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once."""
    return Settings()
