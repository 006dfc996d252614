"""The report's confident gallery: fooling images the model is at least P sure of, from an attack
output run with ``--confidence P`` (attacks.fool) on the same model as the report's.

    >>> html = gallery(results_uri, main_manifest, names, count=6)    # "" when not given

The attack stops at the decision boundary by default, where the target wins with a probability
just over its rivals'; pushed on to P (0.99 in ``make demo``), the images are what the blog shows:
a class the model is all but certain of, with a change still too small to notice.
"""

from __future__ import annotations

from attacks.pairs import Pairs, kept_ids, open_attack
from common import schema
from common.errors import ConfigError
from report import examples, page, story


def gallery(results: str, main: dict, names: list[str], count: int) -> tuple[str, str]:
    """(title, HTML) of the ``count`` smallest changes that reach the run's confidence, each of
    its own target, from the attack output ``results``; refused in one line when it was not run
    with --confidence or attacked another model than ``main`` (the report's attack manifest)."""
    m = open_attack(results, (schema.M_FILES, schema.M_SOURCE, schema.M_IDENTITY))
    settings = m[schema.M_IDENTITY]["settings"]
    if m[schema.M_SOURCE].get("model_sha256") != main[schema.M_SOURCE].get("model_sha256"):
        raise ConfigError(f"--confident {results} attacked another model than --results did")
    conf = settings.get("confidence")
    if conf is None:
        raise ConfigError(f"--confident {results} was run without --confidence: its images stop "
                          "at the decision boundary")
    model = examples.attack_model(results, m)
    pairs = Pairs(results, m[schema.M_FILES])
    methods = m[schema.M_COUNTS]["methods"]
    method = next((x for x in ("iterative", "sign", "exact") if x in methods), methods[0])
    picks = examples.extremes(pairs, method, settings["targets"], 4 * count,
                              kept=kept_ids(m))["smallest"]
    mine = examples.distinct_targets(picks, count)  # at most one per image: extremes
    exs = examples.examples_of(examples.stored_rows(pairs, mine), m, model)
    text = (f"<p>The same model, the attack pushed on until the model gives the target at least "
            f"{page.percent(conf)} ({story.method_name(method)}, "
            f"<code>--confidence {conf:g}</code>): the smallest such changes, each to a target of "
            "its own.</p>")
    return f"Fooling images at {page.percent(conf)} confidence", text + page.pairs(
        exs, names, tuple(m[schema.M_IMAGE_SHAPE]))
