"""Every method on one footing: a dose-response sweep, then the effect each reaches at one coherence budget.

A method maps a coefficient c to a way of running the model: hooks (adapter, additive vectors) or a system
prompt (prompting). Coherence is **KL(reference ‖ steered)** per token on neutral text (``budget_metric="kl"``,
the default: ΔNLL can go negative while a model drifts, so it is reported beside, never budgeted on alone).
For each method and sign the sweep brackets the coefficient c* where the metric meets the budget (doubling or
halving, then bisection; coherence is cheap), then measures the concept's effects on a grid around c*
(``grid``: fractions of c*, ≥ 7 per direction by default) and at both ends of the bracket. The effect at the
budget is interpolated between the two bracket ends, per item as well as in the mean, which gives a paired
95 % confidence interval over items. Methods are compared there, never at equal coefficient.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase

from .. import progress as command_progress
from ..config import BudgetMetric, SweepConfig
from ..evaluation.concepts import Effect, Ends
from ..evaluation.evaluate import CoherenceReference, Steer, coherence
from ..method.adapter import apply_adapters
from ..method.directions import SteeringVector, additive_vector
from ..registry import MethodSpec
from ..training.loop import train
from .stats import iso_coherence, mean_ci, monotonicity, paired_difference

_DEFAULTS = SweepConfig()  # every default of SweepData below is SweepConfig's (one source; test_cli checks)


@dataclass(frozen=True)
class Method:
    """``steer(c)`` gives the hooks at coefficient c (None: no hooks); ``system(c)`` a system prompt."""

    name: str
    steer: Callable[[float], Steer | None]
    system: Callable[[float], str | None] = lambda c: None
    c_init: float = 1.0      # first coefficient tried when searching for the budget
    c_max: float = 16.0      # the search gives up beyond this (the budget is then "not reached")
    fixed: tuple[float, ...] = ()  # a method with a fixed grid (prompting) skips the search
    trained: dict | None = None  # a method trained here (learned_vector): its run's record (``training_record``)


def adapter_method(adapters, name: str = "adapter") -> Method:
    return Method(name, lambda c: (lambda b: apply_adapters(b, adapters, c)) if c != 0 else None,
                  c_init=1.0, c_max=16.0)


def vector_method(name: str, vec: SteeringVector) -> Method:
    """Coefficient unit: one RMS norm of the residual stream per layer (see ``directions.steering_vector``)."""
    return Method(name, lambda c: vec.scaled(c).apply if c != 0 else None, c_init=0.05, c_max=4.0)


def prompting_method(plus: str = "Be honest.", minus: str = "Be dishonest.") -> Method:
    """c = +1: system prompt ``plus``; c = −1: ``minus``; c = 0: the template's default."""
    return Method("prompting", lambda c: None, lambda c: plus if c > 0 else minus if c < 0 else None,
                  fixed=(-1.0, 1.0))


@dataclass(frozen=True)
class BuildContext:
    """What a registered method is built from (registry.py): the model, the trained artifacts by label, the
    training pairs' c = 0 states at the resid_post of the adapted blocks (``hs``), their batches, the concept."""

    bridge: TransformerBridge
    artifacts: dict  # label -> io.SteeringArtifact
    hs: dict
    batches: list
    concept: object  # concepts.Concept
    tokenizer: PreTrainedTokenizerBase | None = None
    pairs: list | None = None  # the pairs the artifacts were trained from, before their split (a trained method's)
    # train.GenericText: the KL text, computed once per model (None: computed when needed)
    generic: object = None

    @property
    def artifact(self):
        """The first artifact (None without one): the loss direction the gradient method reads."""
        return next(iter(self.artifacts.values()), None)


def build_method(spec: MethodSpec, ctx: BuildContext) -> list[Method]:
    """The sweep methods of one registry entry."""
    return list(spec.builder()(spec, ctx))


def build_adapter(spec: MethodSpec, ctx: BuildContext) -> list[Method]:
    return [adapter_method(a.adapters, label) for label, a in ctx.artifacts.items()]


def build_prompting(spec: MethodSpec, ctx: BuildContext) -> list[Method]:
    return [prompting_method(*ctx.concept.prompts)]  # type: ignore[attr-defined]


def build_learned_vector(spec: MethodSpec, ctx: BuildContext) -> list[Method]:
    """One steering vector per adapted block, trained like the first artifact's adapter (its pairs, split, steps,
    objective and KL constraint: ``bias="only"``, so each block writes ``c·b`` and b is all that is learned)."""
    if ctx.artifact is None or ctx.pairs is None or ctx.tokenizer is None:
        raise ValueError(f"method {spec.name!r} is trained with an adapter's settings and pairs: sweep it beside "
                         "a "
                         "trained adapter (demo, study, or eval of an artifact)")
    cfg = dataclasses.replace(ctx.artifact.config, bias="only", rank=1, rotate_u=False)
    result = train(ctx.bridge, ctx.tokenizer, ctx.pairs, cfg, progress=False, generic=ctx.generic)  # type: ignore[arg-type]
    return [dataclasses.replace(adapter_method(result.adapters, spec.name), trained=training_record(result))]


def training_record(result) -> dict:
    """What a report keeps of a training run (a few kB): its time, held-out table, steps run, whether it
    stopped early, the held-out curve and every step's loss parts."""
    m = result.metrics
    return {"seconds": result.timings.get("train_s"), "held_out": m["held_out"], "steps_done": m.get("steps_done"),
            "stopped_early": m.get("stopped_early", False), "curve": m.get("curve", []), "history": result.history}


def build_additive(spec: MethodSpec, ctx: BuildContext) -> list[Method]:
    return [vector_method(spec.name, additive_vector(ctx.bridge, spec.name, ctx.artifact, ctx.hs, ctx.batches))]


@dataclass
class Point:
    method: str
    coeff: float
    dnll: float
    kl_mean: float
    kl_p95: float
    effects: dict[str, float] = field(default_factory=dict)        # mean over defined items, per effect
    items: dict[str, list[float]] = field(default_factory=dict)    # per item, per effect (NaN: undefined)

    def cost(self, metric: BudgetMetric) -> float:
        return self.kl_mean if metric == "kl" else self.dnll


@dataclass
class SweepData:
    """What every point is measured on (the same for every method)."""

    effects: Sequence[Effect]
    coherence_ref: CoherenceReference
    budget: float = _DEFAULTS.budget
    budget_metric: BudgetMetric = _DEFAULTS.budget_metric
    bisect_iters: int = _DEFAULTS.bisect
    grid: tuple[float, ...] = _DEFAULTS.grid  # × c*, beside the bracket ends
    verbose: bool = False  # one line per measured point
    ends: Ends | None = None  # the concept's metric of both directions at the budget (Concept.ends)

    @property
    def primary(self) -> str:
        return self.effects[0].name


def measure(bridge, tok, method: Method, c: float, data: SweepData, effect: bool = True) -> Point:
    t = time.perf_counter()
    steer, system = method.steer(c), method.system(c)
    coh = coherence(bridge, tok, steer, reference=data.coherence_ref, system=system)
    p = Point(method.name, c, coh.dnll, coh.kl_mean, coh.kl_p95)
    if effect:
        for e in data.effects:
            out = e.measure(bridge, tok, steer, system)
            for name, items in (out.items() if isinstance(out, dict) else ((e.name, out),)):
                items = items.cpu().double()  # statistics on the CPU (MPS has no float64)
                ok = items[torch.isfinite(items)]
                p.effects[name] = ok.mean().item() if len(ok) else math.nan
                p.items[name] = items.tolist()
    full = steer is None  # c = 0 and prompting: the whole model runs (no prefix to reuse)
    command_progress.tick(("point_full:" if full else "point:") + data.primary if effect else "probe")
    if data.verbose:
        shown = "  ".join(f"{k}={v:+.3f}" for k, v in p.effects.items()) if effect else "(budget search)"
        tqdm.write(f"  {method.name:>10s} c={c:+.4g}  KL={p.kl_mean:.4f}  dNLL={p.dnll:+.4f}  {shown}"
                   f"  [{time.perf_counter() - t:.1f}s]")
    return p


def budget_bracket(bridge, tok, method: Method, sign: float, data: SweepData, probes: list[Point]
                   ) -> tuple[float, float | None]:
    """(lo, hi): |c| with cost ≤ budget at lo and > budget at hi (hi None: never crossed up to c_max).

    From c_init, double while within budget, or halve while over it, then bisect ``data.bisect_iters`` times.
    """
    def over(c: float) -> bool:
        p = measure(bridge, tok, method, sign * c, data, effect=False)
        probes.append(p)
        return p.cost(data.budget_metric) > data.budget

    lo, hi, c = 0.0, None, method.c_init
    if over(c):
        hi = c
        while c > method.c_init / 64:
            c /= 2
            if not over(c):
                lo = c
                break
            hi = c
    else:
        lo = c
        while 2 * c <= method.c_max:
            c *= 2
            if over(c):
                hi = c
                break
            lo = c
    if hi is None:
        return lo, None
    for _ in range(data.bisect_iters):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if over(mid) else (mid, hi)
    return lo, hi


MIN_POINTS = 8  # measured points per direction of a searched method (fewer only if the grid itself is shorter)
FILL = (0.1, 0.3, 0.5, 0.7, 0.95, 1.05)  # fractions of c* added where the grid and the bracket ends coincide


def dose_grid(lo: float, hi: float | None, grid: Sequence[float], crossing: float | None = None,
              min_points: int = 0) -> list[float]:
    """|c| values to measure the effect at: the bracket ends and ``grid`` fractions of the crossing c*
    (``crossing``, the budget's coefficient interpolated in the bracket; without it hi, or lo where the budget was
    never reached), positive, sorted; values within 1e-6 (relative) of one another count once, and with
    ``min_points`` the ``FILL`` fractions of c* are added in turn until there are that many."""
    anchor = crossing if crossing is not None else hi if hi is not None else lo
    values: list[float] = []

    def add(x: float) -> None:
        if x > 0 and all(abs(x - v) > 1e-6 * max(x, v) for v in values):
            values.append(x)

    for x in (lo, hi, *(anchor * f for f in grid)):
        if x is not None:
            add(x)
    for f in FILL:
        if len(values) >= min_points:
            break
        add(anchor * f)
    return sorted(values)


def crossing(lo: float, hi: float | None, probes: Sequence[Point], sign: float, budget: float,
             metric: BudgetMetric) -> float | None:
    """c* in (lo, hi]: where the cost would reach ``budget``, linear between the probes' costs at lo and hi
    (0 at c = 0); None where the budget was never reached."""
    if hi is None:
        return None
    cost = {p.coeff: p.cost(metric) for p in probes}
    k_lo, k_hi = (0.0 if lo == 0 else cost[sign * lo]), cost[sign * hi]
    if not k_hi > k_lo:
        return hi
    return lo + (hi - lo) * min(1.0, max(0.0, (budget - k_lo) / (k_hi - k_lo)))


@dataclass
class MethodResult:
    name: str
    points: list[Point]                       # effect measured
    probes: list[Point] = field(default_factory=list)  # coherence only (the budget search)
    iso: dict = field(default_factory=dict)
    seconds: float = 0.0


def sweep_method(bridge, tok, method: Method, data: SweepData, zero: Point) -> MethodResult:
    """The method's dose-response in both directions around its budget crossing (``dose_grid``) and at c = 0."""
    t = time.perf_counter()
    probes: list[Point] = []
    if method.fixed:
        coeffs = list(method.fixed)
    else:
        coeffs = []
        for sign in (1.0, -1.0):
            lo, hi = budget_bracket(bridge, tok, method, sign, data, probes)
            at = crossing(lo, hi, probes, sign, data.budget, data.budget_metric)
            # ≥ 8 points a direction around c*, the highest at 1.15 c* (KL ≈ 1.3× the budget if it grows as c²)
            # (a grid meant for fewer, the quick preset's, keeps its size)
            fill = MIN_POINTS if len(data.grid) + 2 >= MIN_POINTS else 0
            coeffs += [sign * x for x in dose_grid(lo, hi, data.grid, at, fill)]
    points = [zero] + [measure(bridge, tok, method, c, data) for c in sorted(coeffs)]
    points = sorted(points, key=lambda p: p.coeff)
    points = [Point(**{**asdict(p), "method": method.name}) for p in points]
    res = MethodResult(method.name, points, probes, seconds=time.perf_counter() - t)
    res.iso = iso_summary(points, data.budget, data.budget_metric, data.primary)
    if data.ends is not None:
        res.iso["ends"] = ends_at_budget(points, res.iso, data.ends)
    return res


def items_at(points: Sequence[Point], coeff: float) -> dict[str, list[float]]:
    """Every per-item series at ``coeff``, each item interpolated between the measured points (NaN outside)."""
    c = [p.coeff for p in points]
    return {k: [_interp(c, [p.items[k][i] for p in points], coeff) for i in range(len(points[0].items[k]))]
            for k in points[0].items}


def ends_at_budget(points: Sequence[Point], iso: dict, ends: Ends) -> dict:
    """``ends(minus, zero, plus)`` on the per-item series at the budget's coefficient in each direction."""
    at = {side: items_at(points, iso[side]["coeff"]) for side in ("minus", "plus")}
    return {**ends(at["minus"], items_at(points, 0.0), at["plus"]),
            "coeffs": {"minus": iso["minus"]["coeff"], "plus": iso["plus"]["coeff"]}}


def iso_summary(points: Sequence[Point], budget: float, budget_metric: BudgetMetric, primary: str) -> dict:
    """The iso-coherence row of one method: every effect at the budget in each direction, its change from
    c = 0 with a paired 95 % CI over items, and the shape of the primary effect's curve."""
    c = [p.coeff for p in points]
    cost = [p.cost(budget_metric) for p in points]
    iso = iso_coherence(c, [p.effects[primary] for p in points], cost, budget)
    out: dict = {"budget": budget, "budget_metric": budget_metric, "effect": primary,
                 "at_zero": {k: v for k, v in points[c.index(0.0)].effects.items()}, "symmetry": iso.symmetry,
                 "monotonicity": monotonicity(c, [p.effects[primary] for p in points])}
    for side, ip in (("plus", iso.plus), ("minus", iso.minus)):
        s: dict = {"coeff": ip.coeff, "budget_reached": ip.crossed, "effects": {}}
        for e in points[0].effects:
            s["effects"][e] = paired_delta(points, ip.coeff, e)
        for key in ("kl_mean", "dnll"):
            s[key] = _interp(c, [getattr(p, key) for p in points], ip.coeff)
        s["peak"] = peak_within_budget(points, side, budget, budget_metric, primary, ip.coeff)
        out[side] = s
    return out


def peak_within_budget(points: Sequence[Point], side: str, budget: float, budget_metric: BudgetMetric,
                       primary: str, at_budget: float) -> dict:
    """The largest primary effect that way (+: highest, −: lowest) at any measured coefficient of that sign
    whose cost is within the budget, with its paired CI against c = 0, and whether the curve *turns back*: the
    peak lies below the budget's |c| and the effect at the budget is smaller than the peak's, paired over
    items with a 95 % CI excluding zero."""
    sign = 1.0 if side == "plus" else -1.0
    within = [p for p in points if sign * p.coeff > 0 and p.cost(budget_metric) <= budget
              and math.isfinite(p.effects.get(primary, math.nan))]
    if not within:
        return {"coeff": math.nan, "turns_back": False}
    best = max(within, key=lambda p: sign * p.effects[primary])
    out = {"coeff": best.coeff, "cost": best.cost(budget_metric), **paired_delta(points, best.coeff, primary)}
    out.pop("item_deltas")
    out["turns_back"] = False
    if math.isfinite(at_budget) and abs(best.coeff) < abs(at_budget):
        at = items_at(points, at_budget)[primary]
        gap = paired_difference([sign * x for x in best.items[primary]], [sign * x for x in at])
        out["vs_budget"] = gap
        out["turns_back"] = bool(gap["significant"] and gap["diff"] > 0)
    return out


def paired_delta(points: Sequence[Point], coeff: float, effect: str) -> dict:
    """Δ effect at ``coeff`` against c = 0: per item, interpolate its score like the mean and subtract its
    c = 0 score; mean, standard error and 95 % CI over the items defined at every point (a paired comparison)."""
    c = [p.coeff for p in points]
    items = torch.tensor([p.items[effect] for p in points], dtype=torch.float64)  # point × item
    zero = items[c.index(0.0)]
    ok = torch.isfinite(items).all(0)
    deltas = torch.tensor([_interp(c, items[:, i].tolist(), coeff) for i in range(items.shape[1])],
                          dtype=torch.float64) - zero
    d = deltas[ok & torch.isfinite(deltas)]
    value = _interp(c, [p.effects[effect] for p in points], coeff)
    paired, se, ci = mean_ci(d)
    return {"value": value, "delta": value - points[c.index(0.0)].effects[effect], "delta_paired": paired,
            "se": se, "ci95": ci, "n_items": len(d),
            "item_deltas": torch.where(ok, deltas, torch.nan).tolist()}


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    pts = sorted(zip(xs, ys))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return math.nan


def run_sweep(bridge: TransformerBridge, tok: PreTrainedTokenizerBase, methods: Sequence[Method], data: SweepData,
              progress: bool = True) -> list[MethodResult]:
    """Sweep every method; c = 0 (the base model) is measured once and shared."""
    zero = measure(bridge, tok, Method("base", lambda c: None), 0.0, data)
    results = []
    for m in tqdm(methods, desc="methods", disable=not progress or command_progress.active()):
        results.append(sweep_method(bridge, tok, m, data, zero))
    at_prompting_cost(results, data.budget_metric, data.primary)
    return results


def at_prompting_cost(results: Sequence[MethodResult], budget_metric: BudgetMetric, primary: str,
                      name: str = "prompting") -> None:
    """Every method's effects at the cost prompting itself spends, per direction (``iso["at_prompting_cost"]``):
    a prompt rarely spends the budget, so "adapter vs prompting" at the budget compares unequal costs; here the
    steer is read where its curve reaches prompting's KL at c = ±1 (interpolated per item, as at the budget)."""
    prompt = next((r for r in results if r.name == name), None)
    if prompt is None:
        return
    for side, sign in (("plus", 1.0), ("minus", -1.0)):
        target = next((p.cost(budget_metric) for p in prompt.points if p.coeff == sign), math.nan)
        for r in results:
            c = [p.coeff for p in r.points]
            if r is prompt:
                coeff, reached = sign, True
            elif math.isfinite(target) and target <= 0:  # ΔNLL can be negative: equal cost is c = 0 itself
                coeff, reached = 0.0, True
            elif math.isfinite(target):
                costs = [p.cost(budget_metric) for p in r.points]
                iso = iso_coherence(c, [p.effects[primary] for p in r.points], costs, target)
                ip = iso.plus if side == "plus" else iso.minus
                coeff, reached = ip.coeff, ip.crossed
            else:
                coeff, reached = math.nan, False
            r.iso.setdefault("at_prompting_cost", {})[side] = {
                "cost": target, "coeff": coeff, "reached": reached,
                "effects": {e: paired_delta(r.points, coeff, e) for e in r.points[0].effects}}
