"""Preference pairs from a policy's own samples, labelled by the task's verifier: per RL prompt,
k completions at a temperature; a correct one is paired with a wrong one of the same prompt (as
many pairs as the smaller side has), and a prompt the policy gets all right or all wrong gives
none. DPO trains on them (pushing down the mistakes this policy makes), and so does the reward
stage (a verifier-style reward model that ranks this policy's answers, as best-of-N needs)."""

from __future__ import annotations

from transformers import set_seed

from pipeline.errors import ConfigError
from pipeline.evaluate import generate, render_prompts

SOURCES = ("task", "on_policy", "mix")  # where a stage's training pairs come from


def check_data(stage: str, pairs: str, task) -> None:
    """On-policy pairs need the rl split's prompts with answers to judge the samples by."""
    if pairs != "task" and not (task.has_split("rl") and task.has_column("rl", "answer")):
        raise ConfigError(f"stages.{stage}.pairs={pairs} samples the policy on the task's rl prompts and judges them "
                          "by their answers; the task has no rl split with an answer column. Set task.splits.rl "
                          f"(prompts with answers) or use stages.{stage}.pairs=task")


def sample_pairs(model, tokenizer, task, stage_cfg, seed: int, prompts: list[dict] | None = None) -> tuple[list[dict], dict]:
    """(pairs in prompt order, counts): `samples_per_prompt` completions of each of the first
    `pair_prompts` rl prompts at `sample_temperature`, each pair tagged with its prompt's index
    (`group`). Counts: prompts, samples, correct samples, prompts that gave a pair."""
    prompts = task.rl_prompts()[: stage_cfg.pair_prompts] if prompts is None else prompts
    set_seed(seed)
    texts, _ = generate(
        model, tokenizer, render_prompts(tokenizer, task, [p["prompt"] for p in prompts], "chat"),
        temperature=float(stage_cfg.sample_temperature), num_samples=int(stage_cfg.samples_per_prompt),
        max_new_tokens=int(stage_cfg.max_new_tokens), batch_size=int(stage_cfg.eval_batch_size),
    )
    pairs, correct, paired = [], 0, 0
    for index, (problem, samples) in enumerate(zip(prompts, texts)):
        verdicts = [task.verify(t, problem["answer"]) >= 1.0 for t in samples]
        right = [t for t, ok in zip(samples, verdicts) if ok]
        wrong = [t for t, ok in zip(samples, verdicts) if not ok]
        correct += len(right)
        paired += bool(right and wrong)
        pairs += [{"prompt": problem["prompt"], "chosen": c, "rejected": r, "group": index} for c, r in zip(right, wrong)]
    counts = {"prompts": len(prompts), "samples": sum(map(len, texts)), "correct": correct, "prompts_with_pairs": paired}
    return pairs, counts


def split_by_prompt(pairs: list[dict], n_eval: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): whole prompts from the end go to the held-out side until it has at
    least n_eval pairs, so no held-out prompt is trained on."""
    held = 0
    groups = sorted({p["group"] for p in pairs})
    cut = len(groups)
    while cut > 0 and held < n_eval:
        cut -= 1
        held += sum(p["group"] == groups[cut] for p in pairs)
    eval_groups = set(groups[cut:])
    return [p for p in pairs if p["group"] not in eval_groups], [p for p in pairs if p["group"] in eval_groups]
