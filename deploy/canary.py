"""The canary: the archive's golden set sent to the candidate and to the current default, side by side, and the
checks a candidate must pass before it may become the default."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from deploy.client import Detections, Prediction, PredictionError
from deploy.management import DeployError, handler_description
from deploy.store import now, open_archive
from handlers.contract import ModelCard
from packager import golden
from packager.stats import percentile

if TYPE_CHECKING:
    from deploy.commands import Context


def measure(ctx: Context, model: str, versions: list[str], gold: dict[str, Any], images: list[tuple[bytes, Any]],
            warmup: int) -> dict[str, dict[str, Any]]:
    """Send every golden image to each version, interleaved, one request at a time (so latencies compare), and score
    each answer against the image's truth (packager.golden: a label, or true boxes)."""
    results: dict[str, dict[str, Any]] = {v: {"tallies": [], "latency_ms": [], "errors": []} for v in versions}
    with ctx.client(model) as client:
        ask = client.detect if golden.task(gold) == "detection" else client.predict
        for v in versions:  # first calls pay one-off costs (connections, JIT profiling); keep them out of p99
            for data, _ in images[:warmup]:
                try:
                    ask(data, version=v)
                except PredictionError:
                    pass
        for data, truth in tqdm(images, desc=f"canary {model}", disable=not ctx.progress, file=sys.stderr):
            for v in versions:
                try:
                    answer: Prediction | Detections = ask(data, version=v)
                except PredictionError as e:
                    results[v]["errors"].append(f"{type(e).__name__}: {e.message}")
                    results[v]["tallies"].append(golden.missed(truth))
                    continue
                if answer.version != v:
                    results[v]["errors"].append(f"asked for version {v}, answered by {answer.version}")
                    results[v]["tallies"].append(golden.missed(truth))
                    continue
                found = answer.label if isinstance(answer, Prediction) else [
                    (b.label, b.score, list(b.box)) for b in answer.boxes]
                results[v]["tallies"].append(golden.tally(found, truth))
                results[v]["latency_ms"].append(answer.latency_ms)
    for r in results.values():
        r["score"] = golden.score(gold, r.pop("tallies"))
        r["p99_ms"] = percentile(r["latency_ms"], 99)
    return results


def cmd_canary(ctx: Context, model: str, version: str, budget_pt: float, latency_factor: float,
               limit: int | None = None, warmup: int = 5) -> dict[str, Any]:
    """Golden set -> candidate and current default, side by side; raise DeployError with the figures if it fails."""
    info = ctx.mgmt.version(model, version)
    default = ctx.mgmt.default(model)
    arc = open_archive(ctx.store, Path(str(info.get("modelUrl", ""))).name)
    gold = arc.golden()
    images = golden.images(gold)[:limit]
    reference = default if default != version else None
    versions = [version] + ([reference] if reference else [])
    print(f"canary {model} {version}: {len(images)} golden images ({gold['source']}) against "
          + (f"default {reference}" if reference else "its build-time figures only (it is the default)"), flush=True)
    measured = measure(ctx, model, versions, gold, images, warmup)
    cand, name = measured[version], golden.metric(gold)
    build_pct, cand_pct = 100 * golden.build_score(gold, limit), 100 * cand["score"]
    checks: list[tuple[bool, str]] = []
    if cand["errors"]:
        checks.append((False, f"{len(cand['errors'])} of {len(images)} requests failed (first: {cand['errors'][0]})"))
    checks.append((cand_pct >= build_pct - budget_pt - 1e-9,
                   f"served {name} {cand_pct:.2f}% vs build-time {build_pct:.2f}% (budget {budget_pt:.2f} pt)"))
    record: dict[str, Any] = {"time": now(), "sha256": arc.sha256, "n": len(images), "budget_pt": budget_pt,
                              "metric": name, "score": cand["score"], "p99_ms": round(cand["p99_ms"], 3),
                              "build_score": build_pct / 100, "against": reference}
    if reference:
        ref = measured[reference]
        ref_pct = 100 * ref["score"]
        checks.append((ref_pct - budget_pt - 1e-9 <= cand_pct,
                       f"served {name} {cand_pct:.2f}% vs default {reference} {ref_pct:.2f}% on the same images "
                       f"(budget {budget_pt:.2f} pt)"))
        checks.append((cand["p99_ms"] <= latency_factor * ref["p99_ms"],
                       f"p99 {cand['p99_ms']:.1f} ms vs default {ref['p99_ms']:.1f} ms (limit {latency_factor:g}x = "
                       f"{latency_factor * ref['p99_ms']:.1f} ms)"))
        record.update(default_score=ref["score"], default_p99_ms=round(ref["p99_ms"], 3), latency_factor=latency_factor)
        card = ctx.mgmt.call("GET", f"/models/{model}/{reference}", customized="true")
        theirs = _fingerprint(card)
        if theirs and theirs != gold["fingerprint"]:
            print(f"warning: default {reference} was trained on different splits (fingerprint {theirs[:12]} != "
                  f"{gold['fingerprint'][:12]}); it may have seen these golden images in training", file=sys.stderr)
    for ok, text in checks:
        print(f"  {'pass' if ok else 'FAIL'}  {text}")
    passed = all(ok for ok, _ in checks)
    record["passed"] = passed
    ctx.state.model(model)["canary"][version] = record
    ctx.state.save()
    if not passed:
        failed = "; ".join(text for ok, text in checks if not ok)
        raise DeployError(f"canary FAILED for {model} {version}: {failed}. Rollout stopped; "
                          f"{default} stays the default")
    print(f"canary passed for {model} {version}")
    return record


def _fingerprint(described: Any) -> str | None:
    """The data fingerprint in a version's model card, from the management API's describe (customized=true)."""
    try:
        card = ModelCard.from_dict((handler_description(described) or {})["card"])
    except (KeyError, TypeError, ValueError):  # CardError is a ValueError: an older handler's card
        return None
    return card.data.fingerprint if card.data else None


