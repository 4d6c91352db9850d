"""Detection figures other tools published on the ported programs, with where each one comes from.

Only what could be read in the public repositories and abstracts is here; where a tool published nothing on
a class (or the figure could not be found), the table says ``not found`` rather than a number.
"""

from __future__ import annotations

__all__ = ["OVERALL", "PER_PROGRAM", "SOURCES", "published_for"]

#: Where the figures come from.
SOURCES: dict[str, str] = {
    "DD": "DeepDiagnosis/ICSE2022, 'DeepDiagnosis Result/Circle_Result.txt' (one line per model)",
    "DL": "DeepDiagnosis/ICSE2022, 'DeepLocalize Result/Circle.txt' (DeepLocalize run by the DeepDiagnosis authors)",
    "AT": "AUTOTRAINER: the model is under 'Circle/repaired/' in both result files, i.e. AUTOTRAINER detected and "
    "repaired it; README: 701 programs, 422 detected buggy, 414 repaired",
    "UM": "DeepDiagnosis/ICSE2022, 'UMLUAT Result/' (MNIST and CIFAR-10 programs only)",
    "HUMBATOVA": "Humbatova et al., EMSE 30:124 (2025), doi 10.1007/s10664-025-10657-7, abstract (PMC12152046)",
}

#: What each tool reported on a ported program (model id -> tool -> its report), verbatim in substance.
PER_PROGRAM: dict[str, dict[str, str]] = {
    "AUTOTRAINER/circle/model_0ae2cd88": {
        "AT": "detected (repaired)",
        "DD": "batch 0 layer 0: numerical problem forward; 'change the activation function at layer 1'",
        "DL": "batch 0 layer 0: error in forward",
    },
    "AUTOTRAINER/circle/model_5ab0aeda": {
        "AT": "detected (repaired)",
        "DD": "batch 0 layer 2: vanishing gradient in delta weights; 'learning rate'",
        "DL": "batch 4: MDL (model does not learn)",
    },
    "AUTOTRAINER/circle/model_8e28bdef": {
        "AT": "detected (repaired)",
        "DD": "batch 0 layer 16: vanishing gradient in delta weights; 'learning rate'",
        "DL": "batch 0 layer 27: error in forward",
    },
    "AUTOTRAINER/circle/model_8de47bdc": {
        "AT": "detected (repaired)",
        "DD": "batch 0 layer 15: numerical problem forward; 'learning rate'",
        "DL": "batch 1 layer 7: error in forward",
    },
}

#: Overall figures on each tool's own or a common benchmark (not on the programs ported here).
OVERALL: tuple[tuple[str, str, str], ...] = (
    ("AUTOTRAINER", "422 of 701 programs detected as buggy, 414 repaired (its own set; no precision given)", "AT"),
    (
        "best of the four tools compared, DeepFD and Neuralint among them (single ground truth)",
        "recall 0.33, precision 0.21",
        "HUMBATOVA",
    ),
    ("DeepFD (ground truth extended with equivalent patches)", "recall 0.55, precision 0.37", "HUMBATOVA"),
    ("UMLAUT", "not found on the ported classes (its published results are MNIST / CIFAR-10 programs)", "UM"),
    (
        "TheDeepChecker on its own synthetic programs",
        "not found (the repository has logs for one buggy program only)",
        "",
    ),
)


def published_for(name: str) -> dict[str, str]:
    """The published reports on program ``name`` (empty if none was found).

    Example:
        >>> published_for("AUTOTRAINER/circle/model_0ae2cd88")["DL"]
        'batch 0 layer 0: error in forward'
        >>> published_for("TheDeepChecker/baseCNN/high_lr")
        {}
    """
    return dict(PER_PROGRAM.get(name, {}))
