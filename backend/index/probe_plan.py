"""fastscan's stage-2 list choice for one set of categories, built once and reused by every query on it."""

import faiss
import numpy as np
from faiss import swig_ptr


class ProbePlan:
    """A category set's sub-lists for `_probe`: a bitmap selector over the trained ones (FAISS reads the
    bitmap in place: it is kept here) and the untrained ones."""

    def __init__(self, offsets: np.ndarray, trained_sizes: np.ndarray, cats: list[int], nlist: int) -> None:
        mask = np.zeros(nlist, dtype=bool)
        untrained = []
        for c in cats:
            lo, hi = int(offsets[c]), int(offsets[c + 1])
            if trained_sizes[c] == 0:
                untrained.append(np.arange(lo, hi, dtype=np.int64))
            else:
                mask[lo:hi] = True
        self.untrained = np.concatenate(untrained) if untrained else np.zeros(0, np.int64)
        self.trained = int(mask.sum())
        self.bitmap = np.packbits(mask, bitorder="little")  # bit i of byte i >> 3: FAISS's layout
        self.selector = faiss.IDSelectorBitmap(nlist, swig_ptr(self.bitmap))
        self.params = faiss.SearchParameters()
        self.params.sel = self.selector  # FAISS's wrapper keeps a reference too
        self._refine_params: dict[tuple[int, int, int], faiss.IndexRefineSearchParameters] = {}

    def refine_params(self, width: int, k: int, short: int) -> faiss.IndexRefineSearchParameters:
        """`IndexRefine`'s: `short` rows by the codes from the best `width` of these lists, the best k kept."""
        params = self._refine_params.get((width, k, short))
        if params is None:
            lists = faiss.SearchParametersIVF()
            lists.nprobe, lists.quantizer_params = width, self.params
            params = faiss.IndexRefineSearchParameters()
            # IndexRefine takes int(k * k_factor) rows: + 0.5 so that float rounding never drops one
            params.k_factor, params.base_index_params = (short + 0.5) / k, lists
            self._refine_params[(width, k, short)] = params
        return params
