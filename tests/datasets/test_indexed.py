"""IndexedDataset: every field of an item kept, its index appended."""
import pytest
import torch

from pml_dsb.datasets import IndexedDataset


class _Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_all_fields_are_kept_and_the_index_appended():
    ds = IndexedDataset(_Items([("a", 0, "meta0"), ["b", 1, "meta1", 9.5]]))
    assert len(ds) == 2
    assert ds[0] == ("a", 0, "meta0", 0)
    assert ds[1] == ("b", 1, "meta1", 9.5, 1)


def test_an_item_that_is_no_tuple_or_list_is_refused():
    with pytest.raises(TypeError, match="item 0 is a dict"):
        IndexedDataset(_Items([{"image": 1}]))[0]
