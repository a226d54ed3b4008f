"""Markdown table of median ms per provider from a pytest-benchmark JSON.

python benchmarks/compare.py out.json [--baseline sae_lens] [--target fastsae-torch]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json_path")
    ap.add_argument("--baseline", default="sae_lens")
    ap.add_argument("--target", default="fastsae-torch")
    args = ap.parse_args()
    with open(args.json_path) as f:
        data = json.load(f)

    groups: dict[str, dict[str, float]] = {}
    for b in data["benchmarks"]:
        provider = (b.get("params") or {}).get("provider") or b["extra_info"].get("provider")
        groups.setdefault(b["group"] or b["name"], {})[provider] = b["stats"]["median"] * 1e3
    providers = list(dict.fromkeys(p for g in groups.values() for p in g))

    ratio = f"{args.baseline} / {args.target}"
    print("| group | " + " | ".join(f"{p} (ms)" for p in providers) + f" | {ratio} |")
    print("|---" * (len(providers) + 2) + "|")
    for name, ms in groups.items():
        cells = [f"{ms[p]:.1f}" if p in ms else "-" for p in providers]
        base, target = ms.get(args.baseline), ms.get(args.target)
        speedup = f"{base / target:.2f}x" if base and target else "-"
        print(f"| {name} | " + " | ".join(cells) + f" | {speedup} |")
    mi = data.get("machine_info", {})
    print(
        f"\nmedian of {data['benchmarks'][0]['stats']['rounds']} rounds; "
        f"{mi.get('cpu', {}).get('brand_raw', mi.get('processor', '?'))}, "
        f"torch {mi.get('torch_version', '?')}, threads {mi.get('torch_num_threads', '?')}, "
        f"{data.get('datetime', '')}"
    )


if __name__ == "__main__":
    main()
