"""The vLLM command line `tracetrain serve` builds (no vLLM needed)."""

from pathlib import Path

from tracetrain.trainer import serving


def _command(max_loras: int) -> list[str]:
    return serving.build_command(Path("/venv/bin/python"), "/models/tiny", 8000, "float32", 1024, max_loras, 16,
                                 "policy-base", [])


def test_lora_is_on_by_default_with_its_limits():
    cmd = _command(2)
    assert "--enable-lora" in cmd
    assert cmd[cmd.index("--max-loras") + 1] == "2" and cmd[cmd.index("--max-lora-rank") + 1] == "16"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_zero_loras_serves_without_lora_layers():
    cmd = _command(0)
    assert not {"--enable-lora", "--max-loras", "--max-lora-rank"} & set(cmd)
    # full-weight pushes and policy versions still work without LoRA
    assert "--worker-extension-cls" in cmd and "--middleware" in cmd
