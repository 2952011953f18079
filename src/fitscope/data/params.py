"""The ``data:`` section of params.yaml as typed, checked parameters (HIGGS and MNIST)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fitscope.core.checks import check_choice, check_number, from_mapping
from fitscope.core.errors import FitscopeError
from fitscope.data.download import check_source
from fitscope.data.official import SHA256_HEX


# --- parameters (params.yaml `data:`) ------------------------------------------------------------
@dataclass(frozen=True)
class HiggsParams:
    """HIGGS source and split sizes. ``None`` sizes take the documented defaults."""

    source: str = "embedded"  # embedded | uci | mirror
    size: str = "study"  # study: only the rows the split needs; full: the whole file
    mirror: str | None = None
    val_rows: int = 1000
    train_rows: int | None = None
    test_rows: int | None = None
    head_sha256: str | None = None  # pinned sha256 of the streamed rows' decompressed text
    sha256: str | None = None  # size=full: the whole file's sha256 (overrides the default)

    def __post_init__(self) -> None:
        check_choice("data.higgs.source", self.source, ("embedded", "uci", "mirror"))
        check_choice("data.higgs.size", self.size, ("study", "full"))
        check_mirror_param("data.higgs.mirror", self.mirror)
        for key in ("val_rows", "train_rows", "test_rows"):
            check_number(
                f"data.higgs.{key}",
                getattr(self, key),
                low=1,
                integer=True,
                allow_none=key != "val_rows",
            )
        for key in ("head_sha256", "sha256"):
            value = getattr(self, key)
            if value is not None and (
                not isinstance(value, str) or not SHA256_HEX.fullmatch(value)
            ):
                raise FitscopeError(
                    f"data.higgs.{key}={value!r} is not a sha256 (64 lowercase hex digits). Fix: "
                    "quote the value `fitscope fetch higgs` printed, or set it to null"
                )
        if self.sha256 is not None and (self.source == "embedded" or self.size != "full"):
            raise FitscopeError(
                f"data.higgs.sha256 pins a whole downloaded file, but source={self.source} "
                f"size={self.size} downloads none. Fix: set data.higgs.sha256 to null (or use "
                "size: full with source: uci or mirror)"
            )
        if self.head_sha256 is None:
            return
        if not self.streams_head:
            raise FitscopeError(
                "data.higgs.head_sha256 pins a streamed head, but source="
                f"{self.source} size={self.size} verifies the whole file by its own checksum. "
                "Fix: set data.higgs.head_sha256 to null"
            )

    @property
    def streams_head(self) -> bool:
        return self.source != "embedded" and self.size == "study"

    def resolved_test_rows(self) -> int:
        if self.test_rows is not None:
            return self.test_rows
        return 500_000 if (self.source != "embedded" and self.size == "full") else 1000

    def resolved_train_rows(self) -> int | None:
        """Training rows: the classic 10,000 for a streamed head; ``None`` = every row between
        validation and test (embedded, and the whole file with size=full)."""
        if self.train_rows is not None or not self.streams_head:
            return self.train_rows
        return 10_000

    def head_rows(self) -> int:
        """Rows to stream from the top of the file: validation, training, then test."""
        return self.val_rows + (self.resolved_train_rows() or 0) + self.resolved_test_rows()


@dataclass(frozen=True)
class MnistParams:
    """MNIST source and split sizes (the training subset size is chosen per experiment)."""

    source: str = "embedded"  # embedded | official | mirror
    mirror: str | None = None
    val_size: int = 100
    test_size: int | None = None  # None: 1,000 held-out digits (embedded), all of t10k
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("data.mnist.source", self.source, ("embedded", "official", "mirror"))
        check_mirror_param("data.mnist.mirror", self.mirror)
        check_number("data.mnist.val_size", self.val_size, low=1, integer=True)
        check_number("data.mnist.test_size", self.test_size, low=1, integer=True, allow_none=True)
        check_number("data.mnist.seed", self.seed, low=0, integer=True)


def higgs_params(data_section: dict[str, Any] | None) -> HiggsParams:
    return from_mapping(HiggsParams, "data.higgs", (data_section or {}).get("higgs"))


def mnist_params(data_section: dict[str, Any] | None) -> MnistParams:
    return from_mapping(MnistParams, "data.mnist", (data_section or {}).get("mnist"))


def check_mirror_param(key: str, mirror: Any) -> None:
    """A mirror is null, a local directory or an ``http(s)://``/``file://`` base URL."""
    if mirror is None:
        return
    if not isinstance(mirror, str) or not mirror:
        raise FitscopeError(
            f"{key}={mirror!r} is not a location. Fix: set it to a base URL or directory"
        )
    check_source(mirror)
