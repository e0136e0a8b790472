"""The event-level heads' first layer (pcfm.finetuning.task.mlp_head): LayerNorm per event or
BatchStandardize over the batch's events, chosen per run and kept in the checkpoint."""
import pytest
import torch

from pcfm.finetuning import FinetuneModule
from pcfm.finetuning.task import BatchStandardize, mlp_head
from pcfm.nn import Backbone

MODEL = Backbone.from_preset("tiny", depth=1).config


def test_batch_standardize_standardises_each_channel_over_the_events():
    layer = BatchStandardize(3).train()
    x = torch.randn(64, 3) * torch.tensor([0.1, 1.0, 100.0]) + torch.tensor([5.0, -2.0, 1e3])
    y = layer(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std(0, unbiased=False), torch.ones(3), atol=1e-2, rtol=0)
    assert list(dict(layer.named_parameters())) == []  # no learned scale or shift


def test_one_event_in_training_uses_the_running_estimates_and_leaves_them():
    layer = BatchStandardize(2).train()
    layer(torch.tensor([[1.0, 10.0], [3.0, 30.0]]))  # running mean 0.2, 2.0 (momentum 0.1)
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    single = layer(torch.tensor([[2.0, 20.0]]))
    assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_var, var)
    torch.testing.assert_close(single, (torch.tensor([[2.0, 20.0]]) - mean) / torch.sqrt(var + layer.eps))
    assert torch.equal(layer.eval()(torch.tensor([[2.0, 20.0]])), single)


def test_mlp_head_norms_and_a_bad_name():
    assert isinstance(mlp_head(8, 4, 2)[0], torch.nn.LayerNorm)
    assert isinstance(mlp_head(8, 4, 2, norm="batch")[0], BatchStandardize)
    with pytest.raises(ValueError, match="unknown head norm 'group'"):
        mlp_head(8, 4, 2, norm="group")


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_head_norm_is_kept_in_the_checkpoint(task, tmp_path):
    module = FinetuneModule(MODEL, task=task, head_norm="batch",
                            **({"target_mean": [0.0], "target_std": [1.0]} if task == "regression" else {}))
    assert isinstance(module.task.head[0], BatchStandardize)
    module.task.head[0].running_mean.fill_(0.25)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.5.0"}, path)
    again = FinetuneModule.load_from_checkpoint(path)
    assert again.hparams["head_norm"] == "batch" and isinstance(again.task.head[0], BatchStandardize)
    assert torch.all(again.task.head[0].running_mean == 0.25)
    assert isinstance(FinetuneModule(MODEL, task=task).task.head[0], torch.nn.LayerNorm)  # the 0.1 default
    with pytest.raises(ValueError, match="unknown head_norm 'none'"):
        FinetuneModule(MODEL, task=task, head_norm="none")
