"""The generation engine every place that samples uses (the `generation` group, overridable per
stage under stages.<stage>.generation like the trainer group):

    generate             transformers' padded `model.generate` (the default; the fast one on a CPU)
    continuous_batching  transformers' continuous batching (`model.generate_batch`): requests of
                         any length share a paged KV cache, none waits for the longest; grpo's
                         rollouts through TRL's `use_transformers_continuous_batching`
    vllm                 grpo's rollouts through TRL's vLLM integration (colocate or server);
                         needs the `vllm` extra and a CUDA GPU. The pipeline's own sampling
                         (held-out evaluation, the pass-rate curve, test_time, on-policy pairs)
                         has no vLLM engine and uses `generate`, with a log line

The runner sets the stage's engine around its run (`using`); pipeline.evaluate.generate reads it
(`current`), so held-out evaluation, the pass-rate curve, the prompt filter, the on-policy pairs,
the tool loop and test_time's sampling methods all follow the one setting.

In server mode every rank waits for the server's health route (`wait_for_server`) before TRL
builds its client, so a server that never comes up ends the stage with one clear error.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata

from pipeline.errors import ConfigError

ENGINES = ("generate", "continuous_batching", "vllm")
CPU_CACHE_SHARE = 0.05
VLLM_MODES = ("colocate", "server")
# http://host:port of the vLLM server slurm/common.sh started for the job. An environment variable,
# not a config override, so grpo's config hash stays the same on whichever node a requeued job runs.
SERVER_ENV = "PIPELINE_VLLM_SERVER"


class ServerUnavailable(RuntimeError):
    """TRL's vLLM server did not answer its health route within generation.vllm.server_timeout_s."""


def vllm_range() -> tuple[str, str] | None:
    """(lowest, highest) vllm version the installed TRL declares for its `vllm` extra."""
    import re

    for requirement in metadata.requires("trl") or []:
        if requirement.startswith("vllm") and 'extra == "vllm"' in requirement:
            low = re.search(r">=\s*([\w.]+)", requirement)
            high = re.search(r"<=?\s*([\w.]+)", requirement)
            return (low.group(1) if low else "0", high.group(1) if high else "")
    return None


@dataclass(frozen=True)
class Engine:
    """A stage's generation settings (the `generation` group merged with stages.<stage>.generation)."""

    name: str = "generate"
    continuous_batching: dict = field(default_factory=dict)  # transformers' ContinuousBatchingConfig fields
    vllm: dict = field(default_factory=dict)

    @classmethod
    def of(cls, settings) -> Engine:
        from omegaconf import OmegaConf

        plain = OmegaConf.to_container(settings, resolve=True) if not isinstance(settings, dict) else settings
        return cls(str(plain.get("engine", "generate")), dict(plain.get("continuous_batching") or {}),
                   dict(plain.get("vllm") or {}))

    @property
    def sampler(self) -> str:
        """The engine of the pipeline's own sampling: vllm drives TRL's rollouts only."""
        return "generate" if self.name == "vllm" else self.name

    def continuous_batching_options(self) -> dict:
        """ContinuousBatchingConfig fields: the configured ones; on a machine without a GPU, the
        paged cache sized at CPU_CACHE_SHARE of the memory unless set (transformers sizes it
        at 0.6 of the RAM there, which costs seconds to allocate on every call)."""
        import torch

        options = dict(self.continuous_batching)
        sized = any(options.get(k) is not None for k in ("num_blocks", "max_memory_percent"))
        if not sized and not torch.cuda.is_available():
            options["max_memory_percent"] = CPU_CACHE_SHARE
        return options

    def continuous_batching_config(self):
        from transformers.generation import ContinuousBatchingConfig

        return ContinuousBatchingConfig(**self.continuous_batching_options())

    def trl_fields(self) -> dict:
        """GRPOConfig fields for TRL's rollouts with this engine."""
        if self.name == "continuous_batching":
            return {"use_transformers_continuous_batching": True,
                    "transformers_continuous_batching_config": self.continuous_batching_options() or None}
        if self.name != "vllm":
            return {}
        v = self.vllm
        fields = {"use_vllm": True, "vllm_mode": str(v.get("mode", "colocate")),
                  "vllm_importance_sampling_correction": bool(v.get("importance_sampling_correction", True))}
        if fields["vllm_mode"] == "colocate":
            fields.update(vllm_gpu_memory_utilization=float(v.get("gpu_memory_utilization", 0.3)),
                          vllm_enable_sleep_mode=bool(v.get("enable_sleep_mode", False)),
                          vllm_tensor_parallel_size=int(v.get("tensor_parallel_size", 1)))
        else:
            if os.environ.get(SERVER_ENV) or v.get("server_base_url"):
                fields["vllm_server_base_url"] = self.server_url
            else:
                fields.update(vllm_server_host=str(v.get("server_host", "0.0.0.0")),
                              vllm_server_port=int(v.get("server_port", 8000)))
            fields["vllm_server_timeout"] = float(v.get("server_timeout_s", 240.0))
        return fields

    @property
    def server_mode(self) -> bool:
        return self.name == "vllm" and str(self.vllm.get("mode", "colocate")) == "server"

    @property
    def server_url(self) -> str:
        """Where TRL's vLLM server is: the one the sbatch scripts started (SERVER_ENV), else
        server_base_url, else http://server_host:server_port."""
        v = self.vllm
        url = os.environ.get(SERVER_ENV) or v.get("server_base_url")
        if url:
            return str(url).rstrip("/")
        return f"http://{v.get('server_host', '0.0.0.0')}:{int(v.get('server_port', 8000))}"

    def wait_for_server(self) -> None:
        """In server mode, wait until the server answers (no-op otherwise). Every rank calls it, so
        none is left waiting in a collective for a main process that failed."""
        if self.server_mode:
            from pipeline.log import log

            waited = wait_for_server(self.server_url, float(self.vllm.get("server_timeout_s", 240.0)))
            log(f"vLLM server at {self.server_url} answered after {waited:.0f} s")


def wait_for_server(url: str, timeout_s: float, interval_s: float = 2.0) -> float:
    """Poll <url>/health until it answers 200; return the seconds waited. After timeout_s (each
    request bounded by the time left) raise ServerUnavailable naming the address and the fix.
    TRL's own check (trl/generation/vllm_client.py `check_server`) waits only on the main
    process and retries a non-200 answer without a deadline."""
    start = time.monotonic()
    deadline = start + timeout_s
    last = "no answer"
    while True:
        try:
            timeout = min(10.0, max(0.1, deadline - time.monotonic()))
            with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
                if response.status == 200:
                    return time.monotonic() - start
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            last = str(getattr(err, "reason", err))
        if time.monotonic() >= deadline:
            break
        time.sleep(max(0.0, min(interval_s, deadline - time.monotonic())))
    address = urllib.parse.urlsplit(url).netloc
    raise ServerUnavailable(
        f"no vLLM server answered at {address} ({url}/health) within generation.vllm.server_timeout_s={timeout_s:g}s "
        f"(last: {last}). Check the server's log (the sbatch scripts write <run.dir>/vllm-server-<job id>.log) and that "
        f"`trl vllm-serve --model <the stage's input> --port {address.rpartition(':')[2]}` runs on "
        f"{address.rpartition(':')[0]}; a large model loads slowly: raise generation.vllm.server_timeout_s")


def check(engine: Engine, stage: str) -> None:
    """ConfigError, before any compute, for an unknown engine or a vllm request this machine or
    environment cannot serve (the package missing or outside TRL's range, no CUDA GPU)."""
    key = f"generation.engine (stages.{stage}.generation.engine)"
    if engine.name not in ENGINES:
        raise ConfigError(f"{key}={engine.name!r} is unknown; valid: {', '.join(ENGINES)}")
    if engine.name == "continuous_batching":
        try:
            engine.continuous_batching_config()
        except (TypeError, ValueError) as err:
            raise ConfigError(f"generation.continuous_batching={engine.continuous_batching}: {err}; the keys are "
                              "transformers' ContinuousBatchingConfig fields (e.g. num_blocks, max_batch_tokens)") from err
    if engine.name != "vllm":
        return
    mode = str(engine.vllm.get("mode", "colocate"))
    if mode not in VLLM_MODES:
        raise ConfigError(f"generation.vllm.mode={mode!r}; valid: {', '.join(VLLM_MODES)}")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{key}=vllm: the vllm package is not installed; pip install -e '.[vllm]' on a CUDA machine, "
                          "or set generation.engine=generate")
    bounds = vllm_range()
    if bounds is not None:
        from packaging.version import Version

        installed = Version(metadata.version("vllm"))
        low, high = bounds
        if installed < Version(low) or (high and installed > Version(high)):
            raise ConfigError(f"{key}=vllm: vllm {installed} is outside the range TRL {metadata.version('trl')} "
                              f"supports ({low} to {high}); pip install 'vllm>={low},<={high}'")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{key}=vllm needs a CUDA GPU, and this machine has none; set generation.engine=generate "
                          "(or continuous_batching)")


_CURRENT: contextvars.ContextVar[Engine] = contextvars.ContextVar("generation_engine", default=Engine())


def current() -> Engine:
    """The engine of the stage running now (`generate` outside a stage)."""
    return _CURRENT.get()


@contextlib.contextmanager
def using(engine: Engine) -> Iterator[Engine]:
    token = _CURRENT.set(engine)
    try:
        yield engine
    finally:
        _CURRENT.reset(token)
