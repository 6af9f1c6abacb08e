"""How fragile a MoE checkpoint's routing is: the share of tokens whose top-k expert set changes
in each layer, and the KL of the next-token distribution, after a random +-eps change of every
weight (eps per weight, the size of one early Adam step at lr=eps).

    python benchmarks/moe_routing.py --init /path/to/sft/final [--examples 64] [--eps 1e-5,1e-4,1e-3]

Measured on the task's SFT examples in the checkpoint's chat template (benchmarks/RESULTS.md, "Why the demo trains only the last block").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.evaluate import render_prompts  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.tasks import build_task  # noqa: E402
from pipeline.tokenizer import load_chat_tokenizer  # noqa: E402
from pipeline.config import compose_config  # noqa: E402


def routes(model, batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(per layer: each token's sorted top-k expert indices, next-token log-probs)."""
    k = model.config.num_experts_per_tok
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
    return [r.topk(k, -1).indices.sort(-1).values for r in out.router_logits], out.logits.log_softmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", required=True, help="a MoE checkpoint with a chat template (e.g. sft/final)")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--eps", default="1e-5,1e-4,1e-3")
    args = parser.parse_args()

    task = build_task(compose_config([]).task)
    tokenizer = load_chat_tokenizer(args.init)
    model = load_model(args.init).eval()
    if not hasattr(model.config, "num_experts_per_tok"):
        raise SystemExit(f"{args.init} is not a MoE model (no num_experts_per_tok in its config)")
    examples = task.sft_examples()[: args.examples]
    texts = [render_prompts(tokenizer, task, [e["prompt"]], "chat")[0] + e["completion"] for e in examples]
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    real = batch["attention_mask"].reshape(-1).bool()
    base_routes, base_logp = routes(model, batch)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    rms = torch.cat([w.flatten() for n, w in weights.items() if w.dim() > 1]).pow(2).mean().sqrt().item()
    print(f"{args.init}: {len(base_routes)} MoE layers, top-{model.config.num_experts_per_tok}, "
          f"{int(real.sum())} tokens, weight rms {rms:.4f}")
    print("eps      share of tokens whose expert set changed, per layer        KL mean    KL max")
    for eps in (float(e) for e in args.eps.split(",")):
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(torch.randint(0, 2, p.shape, generator=generator).to(p.dtype).mul_(2).sub_(1) * eps)
        new_routes, new_logp = routes(model, batch)
        changed = [float((a != b).any(-1).reshape(-1)[real].float().mean()) for a, b in zip(base_routes, new_routes)]
        kl = (base_logp.exp() * (base_logp - new_logp)).sum(-1).reshape(-1)[real]
        print(f"{eps:<8g} {'  '.join(f'{c:6.2%}' for c in changed):58s} {kl.mean():.2e}   {kl.max():.2e}")
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name])


if __name__ == "__main__":
    main()
