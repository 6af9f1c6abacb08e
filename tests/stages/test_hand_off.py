"""What one stage hands the next, as the smoke chain leaves it: weight files with the umask's
permissions (safetensors writes 0600), and every final/ tokenizer padding on the side it was
loaded with (grpo pads left to generate, and hands on the tokenizer it was given)."""

import json
import os
import stat

from tests.conftest import SMOKE_CHAIN  # noqa: F401 (the chain the fixture runs)


def test_weight_files_get_the_umask_permissions(smoke_chain_run):
    umask = os.umask(0)
    os.umask(umask)
    weights = sorted(smoke_chain_run.glob("*/final/**/*.safetensors")) + sorted(smoke_chain_run.glob("*/checkpoint-*/*.safetensors"))
    assert len(weights) >= 6
    modes = {str(p.relative_to(smoke_chain_run)): stat.S_IMODE(p.stat().st_mode) for p in weights}
    assert modes == {name: 0o666 & ~umask for name in modes}


def test_every_final_tokenizer_pads_on_the_right_as_it_was_loaded(smoke_chain_run):
    sides = {}
    for config in sorted(smoke_chain_run.glob("*/final/tokenizer_config.json")):
        sides[config.parent.parent.name] = json.loads(config.read_text()).get("padding_side", "right")
    assert set(sides) >= {"pretrain", "sft", "dpo", "grpo"}
    assert set(sides.values()) == {"right"}, sides
