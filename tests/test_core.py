"Contract checks for multiminer.core that the notebook's fastcore asserts cannot express (exception types, __all__)."
import pytest, torch
import multiminer.core as core
from multiminer.core import region_map, mask_features, size_regularizer, generator_loss, merge_region_maps, input_scale

def test_public_names():
    assert sorted(core.__all__) == sorted(['region_map', 'mask_features', 'size_regularizer', 'generator_loss',
                                           'merge_region_maps', 'input_scale'])

@pytest.mark.parametrize('call', [
    lambda: region_map(torch.zeros(3, 4)),
    lambda: mask_features(torch.zeros(3, 4), torch.zeros(3, 1, 2, 2)),
    lambda: mask_features(torch.zeros(2, 4, 6, 6), torch.zeros(3, 1, 6, 6)),
    lambda: size_regularizer(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4)),
    lambda: size_regularizer(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3)),
    lambda: merge_region_maps([]),
    lambda: merge_region_maps([torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 3, 3)]),
    lambda: input_scale(0, [256, 321]),
    lambda: input_scale(1, [321]),
    lambda: input_scale(1, [321, 256]),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError): call()

def test_error_names_expected_shape():
    with pytest.raises(ValueError, match=r'mask_features: F must be \(N, D, h, w\), got shape \(3, 4\)'):
        mask_features(torch.zeros(3, 4), torch.zeros(3, 1, 2, 2))

def test_equations_on_one_toy_batch():
    M = region_map(torch.tensor([0., 1., 2., 4.]).reshape(1, 1, 2, 2), eps=0)
    assert torch.allclose(M.flatten(), torch.tensor([1., .75, .5, 0.]))
    out = mask_features(torch.ones(1, 2, 2, 2), torch.cat([M, torch.full_like(M, .6)], 1))
    assert torch.allclose(out[0, 1].flatten(), torch.tensor([.6, .6, .5, 0.]))
    assert torch.isclose(size_regularizer(torch.ones(2, 2, 3, 3), torch.tensor([[1., 0.], [0., 0.]])), torch.tensor(-1.5))
    assert generator_loss(1., 2., .5) == 0.
    assert input_scale(3, [1, 2]) == 2
