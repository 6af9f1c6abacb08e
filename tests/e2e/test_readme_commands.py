"""Every `python -m pipeline` command the README (and docs/) shows passes every check before compute, as
written, with the defaults: run.dry_run=true runs the config, input and data checks of a real
invocation and what each stage would do, then stops. Only what needs a download is replaced:
a model family's hub name by a tiny local checkpoint of that family (model.path), a hub data set
by local files in its schema (task.splits), and /path/to/... by checkpoints the smoke chain wrote.
A command of the README that fails its checks fails this test, naming the command."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from pipeline import preemption, sweep
from pipeline.runner import run_pipeline
from tests.conftest import ROOT, compose_config
from tests.stages.test_gsm8k import gsm8k_row
from tests.tiny_models import save_tiny_family

FAMILIES = ("qwen3", "qwen3_moe", "llama3", "smollm2")
SKIP = ("--cfg", "--help", "PYTHONPATH=")  # print the config or the groups; needs the user's own module (tests/e2e has those)
DOCS = ("README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))


def readme_commands() -> list[str]:
    """`python -m pipeline ...` commands of the README and docs/: code-block lines (with their
    `\\` continuations, without comments) and inline code spans, whitespace folded."""
    text = "\n".join((ROOT / name).read_text() for name in DOCS)
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found.append(line.split(" # ")[0].split("&&")[-1])
    for span in re.findall(r"`([^`\n]*(?:\n[^`\n]*)?)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        found.append(span)
    commands = []
    for command in (" ".join(c.split()) for c in found):
        if command.startswith("python -m pipeline ") or command == "python -m pipeline":
            if not any(s in command for s in SKIP) and not command.endswith(" -m") and command not in commands:
                commands.append(command)
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_this_test_runs():
    assert len(COMMANDS) >= 15
    assert "python -m pipeline model=qwen3 task=gsm8k run.stages=[sft,grpo,test_time]" in COMMANDS
    assert "python -m pipeline model=qwen3 run.stages=[sft,dpo,grpo,test_time]" in COMMANDS


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, smoke_chain_run) -> dict:
    """Local stand-ins for what the README's commands would download or name by placeholder."""
    root = tmp_path_factory.mktemp("readme")
    models = {family: save_tiny_family(family, root / family) for family in FAMILIES}
    data = root / "data"
    gsm8k = data / "gsm8k"  # openai/gsm8k's schema, as many rows as the stage defaults hold out and more
    gsm8k.mkdir(parents=True)
    (gsm8k / "train.jsonl").write_text("\n".join(json.dumps(gsm8k_row(a, b)) for a in range(10, 110) for b in (3, 7, 9, 11)))
    (gsm8k / "test.jsonl").write_text("\n".join(json.dumps(gsm8k_row(a, 11)) for a in range(100, 200)))
    chat = data / "ultrachat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                       {"role": "assistant", "content": f"hello {i}"}]})
                              for i in range(400)))
    preference = data / "ultrafeedback.jsonl"
    preference.write_text("\n".join(json.dumps({
        "chosen": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": f"{i + 1}"}],
        "rejected": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": f"{i + 2}"}],
    }) for i in range(600)))
    (root / "data.jsonl").write_text("\n".join(json.dumps({"text": f"Q: {i}+1=?\nA: {i + 1}"}) for i in range(50)))
    (root / "eval.jsonl").write_text("\n".join(json.dumps({"prompt": f"{i}+2=?", "answer": str(i + 2)}) for i in range(50)))
    sweep_job = root / "outputs" / "seeds" / "seed-1" / "sft"
    sweep_job.mkdir(parents=True)
    (sweep_job / "final").symlink_to(smoke_chain_run / "sft" / "final")
    return {"models": models, "gsm8k": gsm8k, "chat": chat, "preference": preference, "cwd": root,
            "checkpoint": smoke_chain_run / "pretrain" / "final", "final": smoke_chain_run / "sft" / "final"}


def local_overrides(command: str, stand_ins: dict) -> list[str]:
    """The command's overrides with its downloads and placeholders replaced by local stand-ins."""
    args = shlex.split(command)[3:]
    for placeholder, path in (("/path/to/checkpoint", stand_ins["checkpoint"]), ("/path/to/final", stand_ins["final"]),
                              ("/path/to/hf/model", stand_ins["models"]["qwen3"]),
                              ("/path/to/model", stand_ins["models"]["qwen3"])):
        args = [a.replace(placeholder, str(path)) for a in args]
    extra = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "model" and value in FAMILIES:
            extra.append(f"model.path={stand_ins['models'][value]}")
        if key == "task" and value == "gsm8k":
            extra += [f"task.splits.{s}={stand_ins['gsm8k']}" for s in ("sft", "rl", "eval")]
        if key == "task" and value == "chat":
            extra.append(f"task.splits.sft={stand_ins['chat']}")
        if key == "task" and value == "preference":
            extra.append(f"task.splits.preference={stand_ins['preference']}")
    return [*args, *extra]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_readme_command_passes_every_check_as_written(command, stand_ins, monkeypatch):
    monkeypatch.chdir(stand_ins["cwd"])  # relative paths (data.jsonl, outputs/...) as a user's
    monkeypatch.setattr(preemption, "install_handlers", lambda: None)
    args = local_overrides(command, stand_ins)
    jobs = sweep.expand([a for a in args if a != "-m"]) if "-m" in args else [args]
    for job in jobs:
        cfg = compose_config([*job, "run.dry_run=true"])
        assert run_pipeline(cfg) == {}, command  # a ConfigError here is the exit 2 the user would get
    assert not (stand_ins["cwd"] / "outputs" / "default").exists()  # a dry run writes nothing
