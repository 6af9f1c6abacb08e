"""Tasks: data generators + verifier + prompt format. `build_task(cfg.task)` picks one."""

from __future__ import annotations

from pipeline.tasks.base import Task, conversational_pairs


def build_task(task_cfg) -> Task:
    if task_cfg.name == "arithmetic":
        from pipeline.tasks.arithmetic import ArithmeticTask

        return ArithmeticTask(task_cfg)
    if task_cfg.name == "jsonl":
        from pipeline.tasks.jsonl import JsonlTask

        return JsonlTask(task_cfg)
    raise ValueError(f"task.name={task_cfg.name!r} is unknown; valid: arithmetic, jsonl")


__all__ = ["Task", "build_task", "conversational_pairs"]
