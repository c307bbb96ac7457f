"""Settings: names are a contract; missing keys give a message naming the key."""

from __future__ import annotations

import pytest

from core.settings import DEFAULT_PROFILE, MissingSettingError, Settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(_env_file=None)
    assert settings.openai_model == "gpt-4o"
    assert settings.deepgram_stt_model == "nova-3"
    assert settings.deepgram_tts_voice == "aura-2-asteria-en"
    assert settings.dealership_profile == DEFAULT_PROFILE


def test_reads_fixed_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("DEEPGRAM_STT_URL", "ws://127.0.0.1:9")
    monkeypatch.setenv("TWILIO_API_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("DATABASE_URL", "")
    monkeypatch.setenv("DEALERSHIP_PROFILE", "")
    settings = Settings(_env_file=None)
    assert settings.openai_base_url == "http://127.0.0.1:9/v1"
    assert settings.deepgram_stt_url == "ws://127.0.0.1:9"
    assert settings.twilio_api_base_url == "http://127.0.0.1:9"
    assert settings.database_url is None
    assert settings.dealership_profile == DEFAULT_PROFILE


def test_missing_keys_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "DEEPGRAM_API_KEY", "TWILIO_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC123")
    settings = Settings(_env_file=None)
    assert "OPENAI_API_KEY" in settings.missing_call_settings()
    assert "TWILIO_ACCOUNT_SID" not in settings.missing_call_settings()
    with pytest.raises(MissingSettingError, match="OPENAI_API_KEY, DEEPGRAM_API_KEY"):
        settings.require("OPENAI_API_KEY", "DEEPGRAM_API_KEY", "TWILIO_ACCOUNT_SID")


def test_every_setting_is_documented_in_env_example() -> None:
    from core.settings import REPO_ROOT

    example = (REPO_ROOT / ".env.example").read_text()
    for field in Settings.model_fields.values():
        alias = field.alias
        if alias == "DATA_DIR":
            assert "DATA_DIR" in example
            continue
        assert f"\n{alias}=" in example, alias
