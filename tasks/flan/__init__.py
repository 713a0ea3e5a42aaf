"""The FLAN collection: 62 datasets in 12 clusters, each a templated seqio task over TFDS.

Importing this package registers every task (`flan_<dataset>`, `flan_<dataset>_eval`,
`flan_<dataset>_fewshot`) and FLAN's mixtures (see `tasks.flan.mixtures`). The tasks
tokenize with `flanjax.data.vocab.DEFAULT_VOCABULARY`: set the run's `TOKENIZER`
(`--gin.TOKENIZER=DIR`, or $FLANJAX_TOKENIZER) to the model's tokenizer directory.
"""

from tasks.flan import (  # noqa: F401  (imported to register; order = cluster order)
    nli,
    commonsense,
    sentiment,
    paraphrase,
    closed_book_qa,
    struct_to_text,
    translation,
    reading_comprehension,
    reading_comprehension_commonsense,
    coreference,
    misc,
    summarization,
    mixtures,
)
