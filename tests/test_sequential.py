import torch
from torch import nn

from compressor.core.compress import compress_
from compressor.core.ranks import RankPolicy
from compressor.methods import build_plan
from compressor.methods.calibration import collect_grams
from compressor.methods.sequential import correct_sequentially, corrected_factors
from compressor.methods.whiten import Whitener, whitened_factors


class Deep(nn.Module):
    def __init__(self, width: int = 24, depth: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x)) + x
        return x


def test_on_the_original_inputs_it_is_the_whitened_optimum():
    torch.manual_seed(0)
    w, x = torch.randn(10, 8, dtype=torch.float64), torch.randn(40, 8, dtype=torch.float64)
    up, down = corrected_factors(w, x.T @ x, x.T @ x, 3, damping=0.0)
    ref_up, ref_down, _, _ = whitened_factors(w, Whitener.from_gram(x.T @ x, 0.0), 3)
    torch.testing.assert_close(up @ down, ref_up @ ref_down)


def test_it_fits_the_original_outputs_from_shifted_inputs():
    torch.manual_seed(1)
    w, x = torch.randn(6, 8, dtype=torch.float64), torch.randn(60, 8, dtype=torch.float64)
    mix = torch.eye(8, dtype=torch.float64) + 0.3 * torch.randn(8, 8, dtype=torch.float64)
    x_new = x @ mix  # an invertible distortion: the full-rank fit undoes it exactly
    up, down = corrected_factors(w, x.T @ x_new, x_new.T @ x_new, 6, damping=0.0)
    torch.testing.assert_close(x_new @ (up @ down).T, x @ w.T)


def test_correction_lowers_the_output_error_of_one_shot_whitening():
    model = Deep()
    batches = [{"x": torch.randn(64, 24) @ torch.diag(torch.linspace(2, 0.05, 24))}
               for _ in range(3)]  # fmt: skip
    targets = dict(model.layers.named_children())
    targets = {f"layers.{n}": m for n, m in targets.items()}
    stats = collect_grams(model, targets, batches)
    plan = build_plan("whiten", targets, stats)
    student = Deep()
    student.load_state_dict(model.state_dict())
    student_targets = {n: student.get_submodule(n) for n in targets}
    compress_(student, student_targets, RankPolicy(rank=6), 2, plan.method, plan.spectra,
              plan.factor_fn)  # fmt: skip

    def error() -> float:
        with torch.no_grad():
            return sum(float((student(**b) - model(**b)).square().sum()) for b in batches)

    one_shot = error()
    refit = correct_sequentially(model, student, batches)
    assert refit == list(targets)
    assert error() < 0.97 * one_shot  # measured: 0.935
