"""Result files of ``ucan certify``: append-only, resumable TSV plus a JSON sidecar.

* :mod:`.schema`: the columns (Cohen et al.'s six first, then ours), rows, reading;
* :mod:`.sidecar`: the config and provenance beside every file;
* :mod:`.writer`: ``ResultWriter``, crash-safe appends and resume;
* :mod:`.shards`: the parts of a multi-process run and their merge.

Nothing here imports torch or the rest of the package (only
:mod:`ucan_smoothing.fileio`), so reading results stays cheap.
"""

from .schema import (
    COHEN_COLUMNS,
    COHEN_SCHEMA,
    DUAL_COLUMNS,
    ELASTIC_COLUMNS,
    FLOAT_SOUND_COLUMN,
    GRID_COLUMNS,
    PREDICT_SCHEMA,
    KINDS,
    KNOWN_COLUMNS,
    MEMORY_COLUMNS,
    RESULT_SCHEMA,
    SEQUENTIAL_COLUMNS,
    UCAN_COLUMNS,
    Column,
    ResultFileError,
    Schema,
    describe_noise,
    read_results,
    read_table,
    row_from_certificate,
)
from .shards import merge_shards, shard_path, split_indices
from .sidecar import (
    FORMAT,
    NON_IDENTITY_KEYS,
    PER_IMAGE_NON_IDENTITY_KEYS,
    config_differences,
    read_sidecar,
    run_environment,
    sidecar_path,
)
from .writer import ResultWriter
from ..fileio import atomic_write_text as atomic_write
