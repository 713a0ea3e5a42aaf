"""FLAN's mixtures: everything, one cluster, and leave one cluster out.

    flan_all_train                  every cluster (examples-proportional, capped at 3,000)
    flan_all_eval                   every dataset's evaluation task
    flan_<cluster>_train            one cluster
    flan_heldout_<cluster>_train    every cluster but <cluster> and those too close to it
    flan_heldout_<cluster>_eval     <cluster>'s evaluation tasks (zero-shot)
    flan_heldout_<cluster>_fewshot  the same with exemplars (few-shot)

FLAN's extra exclusions: NLI and paraphrase hold each other out (both ask whether two
sentences mean the same), and so do reading comprehension / commonsense and reading
comprehension with commonsense.
"""

from __future__ import annotations

from flanjax.data.templated import FLAN_CLUSTERS, TaskDefinitionError, add_mixture

ALSO_HELD_OUT = {
    "nli": ("paraphrase",),
    "paraphrase": ("nli",),
    "reading_comprehension": ("reading_comprehension_commonsense",),
    "commonsense": ("reading_comprehension_commonsense",),
    "reading_comprehension_commonsense": ("reading_comprehension", "commonsense"),
}


def training_clusters(held_out: str) -> list[str]:
    """The clusters trained on when evaluating `held_out` zero-shot."""
    excluded = {held_out, *ALSO_HELD_OUT.get(held_out, ())}
    return [c for c in FLAN_CLUSTERS if c not in excluded]


def heldout_mixture(cluster: str, variant: str = "train") -> str:
    """The name of cluster's leave-one-out mixture (for gin: the cluster is a macro)."""
    if cluster not in FLAN_CLUSTERS:
        raise TaskDefinitionError(f"unknown FLAN cluster {cluster!r}; choose one of {', '.join(FLAN_CLUSTERS)}.")
    return f"flan_heldout_{cluster}_{variant}"


add_mixture("flan_all_train", clusters=FLAN_CLUSTERS)
add_mixture("flan_all_eval", clusters=FLAN_CLUSTERS, variant="eval")
for _cluster in FLAN_CLUSTERS:
    add_mixture(f"flan_{_cluster}_train", clusters=[_cluster])
    add_mixture(f"flan_heldout_{_cluster}_train", clusters=training_clusters(_cluster))
    add_mixture(f"flan_heldout_{_cluster}_eval", clusters=[_cluster], variant="eval")
    add_mixture(f"flan_heldout_{_cluster}_fewshot", clusters=[_cluster], variant="fewshot")
