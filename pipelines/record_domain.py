"""Record a bundle's domain profile (what ``wsiseg segment``'s domain check compares runs with) from its test split.

    python pipelines/record_domain.py BUNDLE --dataset nuinsseg --data-root ../shared/data/nuinsseg --out COPY

Runs the bundle on every image of the split as ``wsiseg segment`` would (tissue
mask on, at the bundle's default threshold) and writes a copy whose header
holds ``domain`` (:class:`wsiseg.domain.DomainProfile`); the weights are
unchanged. ``pipelines/train_default_model.py`` records the profile of the
bundles it packages the same way; ``wsiseg calibrate`` of the ones it calibrates.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, required=True, help="the copy to write (never the bundle itself)")
    args = parser.parse_args(argv)
    if args.out.resolve() == args.bundle.resolve():
        parser.error("--out must be a new file, not the bundle")

    from wsiseg.bundle import load_bundle, save_bundle
    from wsiseg.evaluate import domain_profile, scored_split

    bundle = load_bundle(args.bundle)
    data, samples, _ = scored_split(bundle, args.dataset, args.data_root, args.split, None, False, 0)
    threshold = float(bundle.config["threshold"])
    profile = domain_profile(bundle, data, samples, threshold,
                            f"{args.dataset} {args.split} split, {len(samples)} images")
    save_bundle(args.out, bundle.models, {**bundle.config, "domain": profile.to_config()})
    print(json.dumps(profile.to_config()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
