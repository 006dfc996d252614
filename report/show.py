"""One fooling image as a picture: original | amplified change | fooling image, as in the blog.

    python -m report.show --results out/fooling --image-id ILSVRC2012_val_00000001 \\
        --target 7 [--method exact] --output fooling.png

Reads the stored pair (local or s3:// results; only the row group that holds it), the image it
started from (the validation image from the data the attack read, or the noise start drawn again
from its seed) and the model the attack used, and writes one PNG: each panel the image's pixels
at 4 x 4 (no smoothing: the fooling panel is exactly the stored image), captioned with the class
names and the model's probabilities. A pair that is not in the results, or results written with
--keep-images none, is one line of error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from attacks import figures
from attacks.pairs import Pairs, open_attack
from common import cli, lifecycle, schema, storage
from common.errors import ConfigError
from report import examples, story

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    results: str = field(metadata={"help": "an attack output (attacks.fool): local or s3://"})
    image_id: str = field(metadata={"help": "the image, e.g. ILSVRC2012_val_00000001 or "
                                            "noise-00000"})
    target: str = field(metadata={"help": "the target class: an index or a WNID"})
    output: str = field(metadata={"help": "the PNG to write: local or s3://"})
    method: str | None = field(default=None, metadata={
        "help": "one of the run's methods (default: exact if it ran, else sign)"})


def resolve(cfg: Settings, manifest: dict) -> tuple[int, str]:
    """The target's index and the method, checked against what the run attacked."""
    classes = manifest[schema.M_CLASSES]
    settings = manifest[schema.M_IDENTITY]["settings"]
    if cfg.target.isdigit():
        target = int(cfg.target)
    elif cfg.target in classes:
        target = classes.index(cfg.target)
    else:
        raise ConfigError(f"unknown target {cfg.target!r}: give a class index or a WNID")
    if target not in settings["targets"]:
        raise ConfigError(f"{cfg.results} holds no pairs with target {cfg.target} (it attacked "
                          f"{len(settings['targets'])} targets, e.g. {settings['targets'][:5]})")
    method = cfg.method or story.headline_method(settings["methods"])
    if method not in settings["methods"]:
        raise ConfigError(f"{cfg.results} holds no {method!r} pairs (its methods: "
                          f"{', '.join(settings['methods'])})")
    return target, method


def run(cfg: Settings) -> bytes:
    """Write the picture of one pair; returns its PNG bytes."""
    lifecycle.refuse_overlap(cfg.output, {"results": cfg.results})  # never write into the input
    m = open_attack(cfg.results)
    target, method = resolve(cfg, m)
    if m[schema.M_IDENTITY]["settings"].get("keep_images") == "none":
        raise ConfigError(f"{cfg.results} was written with --keep-images none: it holds no "
                          "fooling images to show")
    model = examples.attack_model(cfg.results, m)
    ex = examples.example(Pairs.open(cfg.results, m), m, model, cfg.image_id, target, method)
    names = schema.class_names(m)
    title = f"{method}: {cfg.image_id} → {names[target]}"
    png = figures.strip(ex, names, tuple(m[schema.M_IMAGE_SHAPE]), title)
    storage.write_bytes(cfg.output, png)
    log.info("%s -> %s (%s): L-inf %.0f, p(target) %.2f: %s", cfg.image_id, target, method,
             ex["linf"], ex["p_target"], cfg.output)
    return png


def main(argv=None) -> None:
    def run_and_show(cfg: Settings) -> None:
        run(cfg)
        print(f"picture: {cfg.output}")

    cli.main(Settings, run_and_show, argv, __doc__, uses_ray=False)


if __name__ == "__main__":
    main()
