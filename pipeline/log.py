"""The pipeline's progress lines: one per event on the main process (`[pipeline] ...`), or one
per rank when every rank's view matters. The base layer: every module may import it."""

from __future__ import annotations

from pipeline import distributed


def log(message: str, every_rank: bool = False) -> None:
    """A line on the main process; with every_rank, one per rank, tagged with the rank."""
    if every_rank and distributed.world_size() > 1:
        state = distributed.state()
        print(f"[pipeline rank {state.process_index}/{state.num_processes}] {message}", flush=True)
    elif distributed.is_main_process():
        print(f"[pipeline] {message}", flush=True)
