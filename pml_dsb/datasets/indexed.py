"""A dataset whose items also carry their own index."""
from __future__ import annotations

from torch.utils.data import Dataset

__all__ = ["IndexedDataset"]


class IndexedDataset(Dataset):
    """Item i of ``dataset`` with i appended: ``(image, label, i)``.

    The index feeds the DSB loss's index-addressed memory (one slot per
    training sample): pass it as ``sample_indices=`` in your own loop, or
    give PML's trainers a :class:`~pml_dsb.losses.SampleIndicesGetter`.
    Items must be tuples or lists (as torchvision's and PML's datasets return).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)):
            raise TypeError(
                f"IndexedDataset needs items that are tuples or lists (e.g. (image, label)); "
                f"item {index} is a {type(item).__name__}"
            )
        return (*item, index)
