"""Benchmark jlora against peer LoRA libraries on one small transformer LM.

Every library trains the *same* model (``models.py``: same architecture, same
base weights, same LoRA A/B initial values, same byte data, AdamW with the same
hyper-parameters) with LoRA rank 16 / alpha 32 on q, k, v, o, up, down, and we
measure:

  compile_s       jax: jit(step).lower(...).compile() wall time (torch: n/a)
  first_step_s    wall time of the first step call (after compile for jax)
  step_ms         median step time over the steps after --warmup
                  (jax: block_until_ready on the new state and the loss)
  peak_rss_mb     ru_maxrss of the worker process (one process per library);
                  rss_import_mb is the same right after importing the library
  opt_state_bytes bytes of optimizer state (should be 2 x LoRA params + count)
  loss_step0      training loss of the first batch, before any update
  loss_final      loss on that same first batch after --steps updates
  dense_w0_grad   jax peers: does the compiled train step contain a dot whose
                  result has a frozen W0's shape and which does not contract
                  over the LoRA rank (i.e. a dense dW0 = x^T dy)? torch: n/a

Peers:
  qwix      Flax Linen model + qwix.LoraProvider / apply_lora_to_model
  nnx_lora  Flax NNX model, targeted nnx.Linear wrapped with nnx.LoRA,
            nnx.Optimizer(wrt=nnx.LoRAParam), grads via DiffState(LoRAParam)
  peft      PyTorch model + peft.LoraConfig / get_peft_model, torch.optim.AdamW
  jlora     this project: Linen model.apply under jlora.lora (skipped, with
            the reason, if jlora does not import or lacks lora_transform)

Each library runs in its own process (this file with --_worker), so peak RSS
and imports are per library. The processes are prepared one after the other
(imports, compilation), then the driver steps them in rounds: every round
runs one training step of each library, in a rotating order, while the
others wait. Drift in the machine's load (a shared machine) hits all alike,
and the medians compare. The table and the JSON name the CPU and its vector
extensions (AVX2, AVX-512, AMX): the ranking depends on them.

Adding a JAX peer: write ``setup_<name>(ctx) -> JaxSetup`` (pure step/loss
functions over a (trainable, opt_state) state and a frozen tree; setup_jlora
and setup_qwix are ~35 lines each) and register it in PEERS; the shared
``JaxSession`` does compile timing, HLO inspection, stepping and losses. A
non-JAX peer is a session of its own (``PeftSession``: ``info``, ``step(i)``,
``finish()``).

Usage:
  python benchmarks/peers.py --quick                      # smoke test
  python benchmarks/peers.py --libs qwix,peft --json benchmarks/out/peers.json
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.append(os.path.dirname(_HERE))  # repo root: jlora without pip install
import harness  # noqa: E402
import models  # noqa: E402

# Optimizer, identical for every peer (optax.adamw / torch.optim.AdamW).
LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01


class Skip(Exception):
    """Raised by a setup function when the peer cannot run here."""


@dataclasses.dataclass
class Context:
    """Everything a runner needs; identical inputs for every peer."""
    cfg: models.ModelConfig
    lcfg: models.LoraConfig
    params: dict[str, np.ndarray]          # canonical base weights (Flax layout)
    lora: dict[str, tuple[np.ndarray, np.ndarray]]  # 'block_i/name' -> (A, B)
    xs: np.ndarray                         # int32 [steps, batch, seq]
    ys: np.ndarray
    steps: int
    warmup: int

    @property
    def target_regex(self) -> str:
        """Regex on module paths ('block_0/q')."""
        return r".*/(%s)" % "|".join(self.lcfg.targets)

    def frozen_shapes(self) -> set[tuple[int, ...]]:
        """Shapes of the frozen LoRA'd kernels W0 (Flax (in, out) layout)."""
        return {s for n, s in self.cfg.proj_shapes().items()
                if n in self.lcfg.targets}


# --------------------------------------------------------------------------
# JAX harness
# --------------------------------------------------------------------------

@dataclasses.dataclass
class JaxSetup:
    """A JAX peer, as pure functions over pytrees.

    state:   what changes each step (trainable params + optimizer state);
             donated to the step.
    frozen:  what does not (base weights); passed as an argument, not closed
             over, so it is not baked into the HLO as constants.
    step(state, frozen, x, y) -> (state, loss)
    loss(state, frozen, x, y) -> loss
    """
    state: tuple[Any, Any]
    frozen: Any
    step: Callable
    loss: Callable
    notes: str = ""


def tree_nbytes(tree) -> int:
    import jax
    return int(sum(getattr(x, "nbytes", None) or np.asarray(x).nbytes
                   for x in jax.tree.leaves(tree)))


_INSTR_RE = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*[a-z]+\d*\[(?P<shape>[\d,]*)\]")
_DOT_RE = re.compile(
    r"=\s*[a-z]+\d*\[(?P<shape>[\d,]*)\](?:\{[^}]*\})?\s+dot\("
    r"%(?P<lhs>[\w.\-]+),")
_CONTRACT_RE = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


def _dims(s: str) -> tuple[int, ...]:
    return tuple(int(d) for d in s.split(",") if d)


def find_dense_w0_dots(hlo: str, w0_shapes: set[tuple[int, ...]], rank: int
                       ) -> list[str]:
    """Dots in compiled HLO text whose result has a frozen W0's shape (either
    layout), except those contracting over exactly the LoRA rank (that is a
    B·A merge, not dW0 = x^T dy, which contracts over batch*seq).

    Compiled HLO prints operands by name only, so operand shapes come from a
    first pass over all instruction definitions (names are module-unique)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for line in hlo.splitlines():
        m = _INSTR_RE.match(line)
        if m:
            shapes[m["name"]] = _dims(m["shape"])
    # fused-computation parameters: '%fused_computation (param_0.1: f32[a,b], ...)'
    for name, shp in re.findall(r"([\w.\-]+): [a-z]+\d*\[([\d,]*)\]", hlo):
        shapes.setdefault(name, _dims(shp))
    hits = []
    for line in hlo.splitlines():
        m = _DOT_RE.search(line)
        if not m:
            continue
        shape = _dims(m["shape"])
        if shape not in w0_shapes and shape[::-1] not in w0_shapes:
            continue
        lhs = shapes.get(m["lhs"])
        cm = _CONTRACT_RE.search(line)
        if lhs is not None and cm:
            csize = int(np.prod([lhs[d] for d in _dims(cm.group(1))]))
            if csize == rank:
                continue
        hits.append(line.strip()[:240])
    return hits


def count_dots(hlo: str) -> int:
    return sum(1 for line in hlo.splitlines() if _DOT_RE.search(line))


class JaxSession:
    """A JAX peer, compiled and ready to step (see ``worker``)."""

    def __init__(self, setup: JaxSetup, ctx: Context):
        import jax
        import jax.numpy as jnp

        self.ctx = ctx
        self.xs, self.ys = jnp.asarray(ctx.xs), jnp.asarray(ctx.ys)
        jax.block_until_ready((self.xs, self.ys))
        self.state = jax.device_put(setup.state)
        self.frozen = jax.device_put(setup.frozen)
        res: dict = {"notes": setup.notes}
        res["opt_state_bytes"] = tree_nbytes(self.state[1])
        res["trainable_params"] = int(sum(x.size for x in jax.tree.leaves(self.state[0])))
        self.loss_fn = jax.jit(setup.loss)
        res["loss_step0_check"] = float(
            self.loss_fn(self.state, self.frozen, self.xs[0], self.ys[0]))
        t = time.perf_counter()
        self.compiled = jax.jit(setup.step, donate_argnums=0).lower(
            self.state, self.frozen, self.xs[0], self.ys[0]).compile()
        res["compile_s"] = time.perf_counter() - t
        # The dW0 check reads shapes, so it needs a token count unlike every
        # weight dim: at batch 8 x 256 = 2048 = d_mlp an input gradient of `up`
        # has the shape of `down`'s kernel. The check then lowers the same step
        # on a batch with one sequence fewer; what XLA computes does not depend
        # on it. A batch whose sizes are no weight dim (--quick) is read as is.
        batch, seq = ctx.xs.shape[1:]
        weight_dims = {d for shape in ctx.frozen_shapes() for d in shape}
        if weight_dims & {batch, seq, batch * seq}:
            probe_hlo = jax.jit(setup.step, donate_argnums=0).lower(
                self.state, self.frozen, self.xs[0][:-1], self.ys[0][:-1]).compile().as_text()
        else:
            probe_hlo = self.compiled.as_text()
        dots = find_dense_w0_dots(probe_hlo, ctx.frozen_shapes(), ctx.lcfg.rank)
        res["dense_w0_grad"] = bool(dots)
        res["dense_w0_dots"] = dots[:8]
        res["hlo_dot_count"] = count_dots(self.compiled.as_text())
        self.info = res

    def step(self, i: int) -> tuple[float, float]:
        import jax
        t = time.perf_counter()
        self.state, loss = self.compiled(self.state, self.frozen, self.xs[i], self.ys[i])
        jax.block_until_ready((self.state, loss))
        return time.perf_counter() - t, float(loss)

    def finish(self) -> dict:
        return {"loss_final": float(self.loss_fn(self.state, self.frozen, self.xs[0],
                                                 self.ys[0]))}


def _xent(logits, y):
    import optax
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype("float32"), y).mean()


def _adamw():
    import optax
    return optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS,
                       weight_decay=WEIGHT_DECAY)


# ---- qwix ---------------------------------------------------------------

def setup_qwix(ctx: Context) -> JaxSetup:
    import jax
    import qwix
    from flax import traverse_util

    provider = qwix.LoraProvider(module_path=ctx.target_regex,
                                 rank=ctx.lcfg.rank, alpha=ctx.lcfg.alpha)
    model = qwix.apply_lora_to_model(models.LinenLM(ctx.cfg), provider)
    # qwix creates '<kernel>_lora_a' (in, r) / '_lora_b' (r, out) params next
    # to each matched kernel during init; take the structure from eval_shape.
    shapes = jax.eval_shape(model.init, jax.random.key(0), ctx.xs[0])["params"]
    base = traverse_util.flatten_dict(models.to_linen(ctx.params), sep="/")
    frozen, trainable = {}, {}
    for k, s in traverse_util.flatten_dict(shapes, sep="/").items():
        if k.endswith("/kernel_lora_a") or k.endswith("/kernel_lora_b"):
            a, b = ctx.lora[k.rsplit("/", 1)[0]]
            v = a if k.endswith("_a") else b
            trainable[k] = v
        else:
            v = frozen[k] = base[k]
        assert v.shape == s.shape, (k, v.shape, s.shape)

    tx = _adamw()

    def loss(state, frozen, x, y):
        params = traverse_util.unflatten_dict({**frozen, **state[0]}, sep="/")
        return _xent(model.apply({"params": params}, x), y)

    def step(state, frozen, x, y):
        trainable, opt_state = state
        l, g = jax.value_and_grad(lambda t: loss((t, None), frozen, x, y))(
            trainable)
        updates, opt_state = tx.update(g, opt_state, trainable)
        return (jax.tree.map(lambda p, u: p + u, trainable, updates),
                opt_state), l

    return JaxSetup(state=(trainable, tx.init(trainable)), frozen=frozen,
                    step=step, loss=loss,
                    notes="grad w.r.t. the *_lora_a/_lora_b leaves only")


# ---- Flax NNX + nnx.LoRA ------------------------------------------------

def setup_nnx_lora(ctx: Context) -> JaxSetup:
    import jax.numpy as jnp
    from flax import nnx

    class ScaledLoRA(nnx.Module):
        """base(x) + (alpha/r) * x A B.  nnx.LoRA has no alpha/scale argument
        (it computes base(x) + x A B), so the scale is applied here."""

        def __init__(self, base: nnx.Linear, rank: int, scale: float, *, rngs):
            self.base = base
            self.lora = nnx.LoRA(base.in_features, rank, base.out_features,
                                 rngs=rngs)
            self.scale = scale

        def __call__(self, x):
            return self.base(x) + self.scale * self.lora(x)

    model = models.NNXLM(ctx.cfg, rngs=nnx.Rngs(0))
    models.load_nnx(model, ctx.params)
    rngs = nnx.Rngs(1)
    for i, blk in enumerate(model.blocks):
        for name in ctx.lcfg.targets:
            layer = ScaledLoRA(getattr(blk, name), ctx.lcfg.rank,
                               ctx.lcfg.scale, rngs=rngs)
            a, b = ctx.lora[f"block_{i}/{name}"]
            layer.lora.lora_a[...] = jnp.asarray(a)
            layer.lora.lora_b[...] = jnp.asarray(b)
            setattr(blk, name, layer)

    optimizer = nnx.Optimizer(model, _adamw(), wrt=nnx.LoRAParam)
    graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)
    opt_graphdef, opt_state = nnx.split(optimizer)

    def loss(state, frozen, x, y):
        m = nnx.merge(graphdef, state[0], frozen)
        return _xent(m(x), y)

    def step(state, frozen, x, y):
        m = nnx.merge(graphdef, state[0], frozen)
        opt = nnx.merge(opt_graphdef, state[1])
        l, grads = nnx.value_and_grad(
            lambda m: _xent(m(x), y), argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        opt.update(m, grads)
        return (nnx.state(m, nnx.LoRAParam), nnx.state(opt)), l

    return JaxSetup(state=(lora_state, opt_state), frozen=rest, step=step,
                    loss=loss,
                    notes="nnx.split/merge + jax.jit (functional NNX API)")


# ---- jlora ----------------------------------------------------------------

def setup_jlora(ctx: Context) -> JaxSetup:
    try:
        import jlora
    except Exception as e:  # noqa: BLE001
        raise Skip(f"jlora core not ready (import failed: {e!r})")
    if not hasattr(jlora, "lora_transform"):
        raise Skip("jlora core not ready (no jlora.lora_transform)")
    import dataclasses as dc
    import jax
    import jax.numpy as jnp
    import optax

    model = models.LinenLM(ctx.cfg)
    params = jax.tree.map(jnp.asarray, {"params": models.to_linen(ctx.params)})
    spec = jlora.LoraSpec(rank=ctx.lcfg.rank, alpha=ctx.lcfg.alpha,
                          targets=ctx.target_regex + "/kernel")
    frozen, trainable = jlora.lora_transform(params, spec, key=jax.random.key(0))
    # Same initial A (in, r) / B (r, out) as every other peer.
    for key, (a, b) in ctx.lora.items():
        node = trainable["params"]
        for part in key.split("/"):
            node = node[part]
        lp = node["kernel"]
        assert lp.a.shape == a.shape and lp.b.shape == b.shape, key
        node["kernel"] = dc.replace(lp, a=jnp.asarray(a), b=jnp.asarray(b))
    apply = jlora.lora(model.apply)
    tx = jlora.optimizer(_adamw(), trainable)

    def loss(state, frozen, x, y):
        return _xent(apply(frozen, state[0], x), y)

    def step(state, frozen, x, y):
        t, opt_state = state
        l, g = jax.value_and_grad(lambda t: loss((t, None), frozen, x, y))(t)
        updates, opt_state = tx.update(g, opt_state, t)
        return (optax.apply_updates(t, updates), opt_state), l

    return JaxSetup(state=(trainable, tx.init(trainable)), frozen=frozen,
                    step=step, loss=loss,
                    notes="Linen model.apply under jlora.lora")


# --------------------------------------------------------------------------
# PyTorch + PEFT
# --------------------------------------------------------------------------

class PeftSession:
    """PyTorch + PEFT, eager, with as many threads as cores."""

    def __init__(self, ctx: Context):
        import torch
        import peft

        self.torch = torch
        n_threads = len(os.sched_getaffinity(0))
        torch.set_num_threads(n_threads)
        torch.manual_seed(0)
        base = models.TorchLM(ctx.cfg)
        models.load_torch(base, ctx.params)
        config = peft.LoraConfig(r=ctx.lcfg.rank, lora_alpha=ctx.lcfg.alpha,
                                 target_modules=list(ctx.lcfg.targets),
                                 lora_dropout=0.0, bias="none")
        self.model = peft.get_peft_model(base, config)
        with torch.no_grad():
            for i, blk in enumerate(self.model.base_model.model.blocks):
                for name in ctx.lcfg.targets:
                    layer = getattr(blk, name)
                    a, b = ctx.lora[f"block_{i}/{name}"]
                    layer.lora_A["default"].weight.copy_(torch.from_numpy(a.T.copy()))
                    layer.lora_B["default"].weight.copy_(torch.from_numpy(b.T.copy()))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=BETAS, eps=EPS,
                                     weight_decay=WEIGHT_DECAY)
        self.xs = torch.from_numpy(ctx.xs).long()
        self.ys = torch.from_numpy(ctx.ys).long()
        self.model.train()
        self.info = {"compile_s": None, "dense_w0_grad": None,
                     "trainable_params": int(sum(p.numel() for p in self.params)),
                     "notes": f"eager, torch.set_num_threads({n_threads}); "
                              "AdamW state includes a per-param step tensor"}

    def _loss(self, i):
        logits = self.model(self.xs[i])
        return self.torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), self.ys[i].reshape(-1))

    def step(self, i: int) -> tuple[float, float]:
        t = time.perf_counter()
        loss = self._loss(i)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = loss.item()
        return time.perf_counter() - t, value

    def finish(self) -> dict:
        with self.torch.no_grad():
            loss_final = self._loss(0).item()
        opt_bytes = sum(v.numel() * v.element_size()
                        for st in self.opt.state.values() for v in st.values()
                        if self.torch.is_tensor(v))
        return {"loss_final": loss_final, "opt_state_bytes": int(opt_bytes)}


# --------------------------------------------------------------------------
# Registry and driver
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Peer:
    requires: tuple[str, ...]   # import names that must be installed
    open: Callable[[Context], Any]   # a session: .info, .step(i), .finish()


def _jax(setup_fn):
    return lambda ctx: JaxSession(setup_fn(ctx), ctx)


PEERS: dict[str, Peer] = {
    "jlora": Peer(("jax", "flax"), _jax(setup_jlora)),
    "qwix": Peer(("jax", "flax", "qwix"), _jax(setup_qwix)),
    "nnx_lora": Peer(("jax", "flax"), _jax(setup_nnx_lora)),
    "peft": Peer(("torch", "peft"), PeftSession),
}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB


def _versions(lib: str) -> dict:
    from importlib import metadata
    names = {"qwix": ["jax", "flax", "qwix"], "nnx_lora": ["jax", "flax"],
             "peft": ["torch", "peft"], "jlora": ["jax", "flax", "jlora"]}
    out = {}
    for n in names.get(lib, []):
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def make_context(args) -> Context:
    cfg = models.ModelConfig.quick() if args.quick else models.ModelConfig()
    lcfg = models.LoraConfig()
    xs, ys = models.make_batches(cfg, args.steps, seed=args.seed)
    return Context(cfg=cfg, lcfg=lcfg, params=models.init_params(cfg, args.seed),
                   lora=models.init_lora(cfg, lcfg, args.seed + 1), xs=xs, ys=ys,
                   steps=args.steps, warmup=args.warmup)


def worker(lib: str, args) -> None:
    """Runs in a library's own process: prepares the library, then steps when
    the driver says so (one JSON line per reply on stdout)."""
    def reply(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    ctx = make_context(args)
    res: dict = {"lib": lib, "versions": _versions(lib)}
    for mod in PEERS[lib].requires:
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001  (the session reports it)
            pass
    res["rss_import_mb"] = _maxrss_mb()
    try:
        t = time.perf_counter()
        session = PEERS[lib].open(ctx)
        res["prepare_s"] = time.perf_counter() - t
    except Skip as e:
        return reply({**res, "status": "skipped", "reason": str(e)})
    except Exception as e:  # noqa: BLE001
        return reply({**res, "status": "error", "reason": repr(e),
                      "traceback": traceback.format_exc()})
    reply({**res, **session.info, "status": "ready"})
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "step":
            seconds, loss = session.step(int(cmd[1]))
            reply({"t": seconds, "loss": loss})
        elif cmd[0] == "finish":
            reply({**session.finish(), "peak_rss_mb": _maxrss_mb()})
            return None
    return None


class _Worker:
    """The driver's handle on one library's process."""

    def __init__(self, lib: str, args):
        self.lib = lib
        cmd = [sys.executable, os.path.abspath(__file__), "--_worker", lib,
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--seed", str(args.seed)] + (["--quick"] if args.quick else [])
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)

    def ask(self, command: str | None = None) -> dict:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.seek(0)
            raise RuntimeError(f"worker exit {self.proc.wait()}: {self.stderr.read()[-3000:]}")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_interleaved(libs: list[str], args) -> list[dict]:
    """One process per library; each is prepared (imports, compile) while the
    others wait, then every round steps each library once, in a rotating
    order, so drift in the machine's load hits all alike."""
    results, workers = {}, {}
    watchdog = threading.Timer(args.timeout, lambda: [w.close() for w in workers.values()])
    watchdog.start()
    try:
        for lib in libs:
            missing = [m for m in PEERS[lib].requires if importlib.util.find_spec(m) is None]
            if missing:
                results[lib] = {"lib": lib, "status": "skipped",
                                "reason": f"not installed: {', '.join(missing)}"}
                continue
            print(f"[{lib}] preparing ...", file=sys.stderr, flush=True)
            w = _Worker(lib, args)
            try:
                first = w.ask()
            except RuntimeError as e:
                first = {"lib": lib, "status": "error", "reason": str(e)}
            if first.get("status") != "ready":
                results[lib] = first
                w.close()
                continue
            results[lib] = {**first, "step_times_s": [], "losses": []}
            workers[lib] = w
        ready = list(workers)
        for i in range(args.steps):
            for lib in ready[i % max(len(ready), 1):] + ready[:i % max(len(ready), 1)]:
                if lib not in workers:
                    continue
                try:
                    out = workers[lib].ask(f"step {i}")
                except RuntimeError as e:
                    results[lib].update(status="error", reason=str(e))
                    workers.pop(lib).close()
                    continue
                results[lib]["step_times_s"].append(out["t"])
                results[lib]["losses"].append(out["loss"])
        for lib, w in list(workers.items()):
            results[lib].update(w.ask("finish"))
            w.close()
    finally:
        watchdog.cancel()
        for w in workers.values():
            w.close()
    out = []
    for lib in libs:
        r = results[lib]
        if r.get("status") == "ready":
            timed = r["step_times_s"][args.warmup:]
            r.update(status="ok", first_step_s=r["step_times_s"][0],
                     loss_step0=r["losses"][0], timed_steps=len(timed),
                     step_ms=1e3 * statistics.median(timed) if timed else None)
        out.append(r)
    return out


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(results: list[dict]) -> None:
    cols = [("lib", 9), ("status", 7), ("compile_s", 9), ("first_s", 8),
            ("step_ms", 9), ("rss_MB", 8), ("opt_KB", 9), ("loss0", 7),
            ("lossN", 7), ("dense_dW0", 9)]
    print(" ".join(f"{c:>{w}}" for c, w in cols))
    for r in results:
        if r["status"] != "ok":
            print(f"{r['lib']:>9} {r['status']:>7}  {r.get('reason', '')}")
            continue
        dw = r.get("dense_w0_grad")
        row = [r["lib"], "ok", _fmt(r["compile_s"], ".2f"),
               _fmt(r["first_step_s"], ".3f"), _fmt(r["step_ms"], ".1f"),
               _fmt(r["peak_rss_mb"], ".0f"),
               _fmt(r["opt_state_bytes"] / 1024, ".1f"),
               _fmt(r["loss_step0"], ".4f"), _fmt(r["loss_final"], ".4f"),
               "n/a" if dw is None else str(dw)]
        print(" ".join(f"{str(v):>{w}}" for v, (_, w) in zip(row, cols)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--libs", default=",".join(PEERS),
                    help=f"comma-separated subset of {','.join(PEERS)}")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps (default 50, --quick 12)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="steps excluded from the median step time")
    ap.add_argument("--quick", action="store_true",
                    help="tiny model (ModelConfig.quick) for smoke tests")
    ap.add_argument("--json", metavar="OUT", help="write results as JSON here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600,
                    help="the whole run's timeout, seconds")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 12 if args.quick else 50
    if args.steps < 1:
        ap.error("--steps must be >= 1")

    if args._worker:
        worker(args._worker, args)
        return 0

    libs = [s.strip() for s in args.libs.split(",") if s.strip()]
    unknown = [l for l in libs if l not in PEERS]
    if unknown:
        ap.error(f"unknown libs {unknown}; choose from {list(PEERS)}")
    if args.steps - args.warmup < 10:
        print(f"note: only {max(args.steps - args.warmup, 0)} timed steps "
              f"(< 10); step_ms is noisy", file=sys.stderr)

    cfg = models.ModelConfig.quick() if args.quick else models.ModelConfig()
    results = run_interleaved(libs, args)
    for r in results:
        if r["status"] == "skipped":
            print(f"[{r['lib']}] skipped: {r['reason']}", file=sys.stderr)
        elif r["status"] == "error":
            print(f"[{r['lib']}] error: {r['reason']}\n{r.get('traceback', '')}",
                  file=sys.stderr)
    print(f"{harness.machine()}; median of {args.steps - args.warmup} interleaved rounds")
    print_table(results)

    if args.json:
        report = {
            "model": dataclasses.asdict(cfg),
            "lora": dataclasses.asdict(models.LoraConfig()),
            "optimizer": {"name": "adamw", "lr": LR, "betas": BETAS, "eps": EPS,
                          "weight_decay": WEIGHT_DECAY},
            "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
            "quick": args.quick,
            "machine": {"python": platform.python_version(), **harness.machine_info()},
            "results": results,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
