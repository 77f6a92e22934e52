"""torch.autograd.gradcheck in float64 for input, theta_alpha, theta_lambda and guide_weight."""
import pytest
import torch

from dpp_surgery import dpp2d

CASES = [
    # kernel, stride, padding, ceil_mode, size
    ((2, 2), None, 0, False, (6, 6)),
    ((3, 3), (2, 2), 1, False, (7, 6)),
    ((3, 3), (2, 2), 0, True, (7, 7)),
    ((3, 3), (2, 2), 'same', False, (5, 6)),
]
VARIANTS = [(g, r, n) for g in ('lite', 'full') for r in ('sym', 'asym') for n in ('mean', 'none', 'sum')]


@pytest.mark.parametrize('impl', ['kernel', 'torch'])
@pytest.mark.parametrize('guide,reward,norm', VARIANTS, ids=['-'.join(v) for v in VARIANTS])
def test_gradcheck(impl, guide, reward, norm):
    for kernel, stride, padding, ceil_mode, (h, w) in CASES:
        c = 2
        x = torch.randn(2, c, h, w, dtype=torch.float64, requires_grad=True)
        ta = (0.3 * torch.randn(c, dtype=torch.float64)).requires_grad_(True)
        tl = (0.3 * torch.randn(c, dtype=torch.float64)).requires_grad_(True)
        inputs = [x, ta, tl]
        gw = None
        if guide == 'full':
            kg = tuple(k + 1 if k % 2 == 0 else k for k in kernel)
            gw = (1.0 / (kg[0] * kg[1]) + 0.1 * torch.randn(c, 1, *kg, dtype=torch.float64)).requires_grad_(True)
            inputs.append(gw)

        def fn(x, ta, tl, *rest):
            return dpp2d(x, ta, tl, kernel, stride, padding, ceil_mode, guide_weight=rest[0] if rest else None,
                         reward=reward, norm=norm, impl=impl)

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4), (kernel, stride, padding)
