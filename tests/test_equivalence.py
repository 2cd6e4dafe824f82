"""The training step on each device and precision (and compiled with CUDA graphs) against
the same steps in float64 on the CPU, from the same training state. On a machine without
a GPU only the CPU's fp32 step runs; scripts/gpu_check.sh runs this file on the GPU.

Every step starts from the float64 run's training state before that step (weights, Adam's
moments, replay buffers), copied in place, and is compared on its seven losses and the four
networks' gradients. (Free-running runs would not do: Adam's first steps move each weight
by about +-lr whatever the gradient's size, so rounding-level differences grow to several
percent within four GAN steps, even between fp32 and float64 on one CPU.) The replay
buffers hold one image, so the discriminators also see stored fakes. With CUDA graphs the
first steps warm up and record, the later ones replay: a graph whose inputs or outputs went
stale would show.

Tolerances (losses, gradients), relative to float64. Losses, fp32: they are smooth functions
of the weights, and fp32 on a CPU is ~2e-6 off; other fp32 kernels (cuDNN's algorithms,
Inductor's fused code) sum in other orders, so 1e-4 leaves ~50x that. The gradients are not
smooth: ReLU's derivative and an L1 loss's are steps, and an activation or pixel within
rounding of the step flips its contribution, which then reaches every layer below. Measured
on a CPU at 32x32 (3 steps, 6 states): relative changes of 1e-6 to the weights change even
float64 gradients by up to 1.2e-2, and fp32 is up to 4.7e-2 off float64. fp32 gradients:
0.2, while a network fed a wrong image (a stale CUDA-graph output) or a wrong backward pass
is off by ~1. bf16 keeps 8 significant bits: losses ~1e-2 off, gradients 10-40% (cosine
0.9-0.99 to float64): (5e-2, 1.0) is a sanity bound (a gradient of 0 is off by 1). CUDA's
default fp32 convolutions use TF32 (inputs rounded to 11 significant bits, fp32 sums): bf16's
bound holds for them."""
import copy

import pytest
import torch

import cyclegan
import gan
import training

FP32_TOL = (1e-4, 0.2)
BF16_TOL = (5e-2, 1.0)
STEPS = 5  # with CUDA graphs, the first ones warm up and record, the last ones replay
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def set_conv_tf32(on):
    """cuDNN's fp32 convolutions in TF32 (PyTorch's default) or in full fp32."""
    if hasattr(torch.backends.cudnn, "conv"):
        torch.backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = on


def copy_state(state, nets, optimizers, buffers, device, dtype):
    """Copy a training state into the networks in place (compiled code and CUDA graphs keep
    their tensors); Adam's state and the buffers' images are cast to this run's dtype."""
    state = copy.deepcopy(state)
    for net, s in zip(nets, state["nets"]):
        net.load_state_dict(s)
    for optimizer, s in zip(optimizers.values(), state["optimizers"]):
        optimizer.load_state_dict(s)
    for buffer, s in zip(buffers.values(), state["buffers"]):
        buffer.load_state_dict(dict(s, data=[d.to(dtype) for d in s["data"]]), device)


def run_steps(device, dtype=torch.float32, amp="none", compile_mode=None, tf32=False, states=None):
    """STEPS training steps of cyclegan.py's networks at 32x32 with 1 residual block, from the
    same weights and inputs on every device. With `states` (the training state before each
    step of another run), every step starts from that run's state. Returns (the training
    state before each step, the losses of each step [steps, 7], each step's gradients: a
    list of 4 vectors), as float64 on the CPU."""
    if device.type == "cuda":
        set_conv_tf32(tf32)
        torch.backends.cudnn.benchmark = True  # as cyclegan.py: cuDNN picks its fastest algorithms
    opt = cyclegan.get_parser().parse_args(["--img_height", "32", "--img_width", "32", "--n_residual_blocks", "1",
                                            "--amp", amp] + (["--compile", compile_mode] if compile_mode else []))
    torch.manual_seed(0)
    nets, _ = cyclegan.build_networks(opt, torch.device("cpu"))  # drawn on the CPU: the same weights everywhere
    nets = {name: net.to(device, dtype) for name, net in nets.items()}
    optimizers, _ = cyclegan.build_optimizers(opt, nets, device)
    buffers = {"fake_A": gan.ReplayBuffer(1, seed=1), "fake_B": gan.ReplayBuffer(1, seed=2)}
    _, autocast, scaler = training.setup_precision(opt, device, training.Processes())
    step_nets = training.networks_for_step(nets, opt, device, training.Processes())
    g = torch.Generator().manual_seed(1)
    real_A, real_B = ((torch.rand(1, 3, 32, 32, generator=g) * 2 - 1).to(device, dtype) for _ in range(2))
    before, losses, grads = [], [], []
    for k in range(STEPS):
        if states is not None:
            copy_state(states[k], nets.values(), optimizers, buffers, device, dtype)
        else:
            before.append(copy.deepcopy({"nets": [n.state_dict() for n in nets.values()],
                                         "optimizers": [o.state_dict() for o in optimizers.values()],
                                         "buffers": [b.state_dict() for b in buffers.values()]}))
        step = cyclegan.train_step(real_A, real_B, step_nets, optimizers, buffers, opt.lambda_cyc, opt.lambda_id,
                                   autocast, scaler)
        losses.append(torch.stack(list(step.values())).double().cpu())
        grads.append([torch.cat([p.grad.flatten() for p in net.parameters()]).double().cpu() for net in nets.values()])
    return before, torch.stack(losses), grads


def errors(run, ref):
    """(largest relative difference of the losses, largest relative L2 difference of a
    network's gradient), over all steps"""
    (_, la, ga), (_, lb, gb) = run, ref
    grad_err = max(float((a - b).norm() / b.norm()) for sa, sb in zip(ga, gb) for a, b in zip(sa, sb))
    return float(((la - lb).abs() / lb.abs().clamp_min(1e-3)).max()), grad_err


@pytest.fixture(scope="module")
def float64_run():
    return run_steps(torch.device("cpu"), torch.float64)


@pytest.mark.parametrize("variant,kwargs,tol", [
    ("cpu fp32", dict(device=torch.device("cpu")), FP32_TOL),
    pytest.param("cuda fp32 (TF32 off)", dict(device=torch.device("cuda")), FP32_TOL, marks=cuda_only),
    pytest.param("cuda bf16 autocast", dict(device=torch.device("cuda"), amp="bf16"), BF16_TOL, marks=cuda_only),
    pytest.param("cuda fp32, TF32 convolutions (PyTorch's default)", dict(device=torch.device("cuda"), tf32=True),
                 BF16_TOL, marks=cuda_only),
    pytest.param("cuda fp32 compiled with CUDA graphs (TF32 off)",
                 dict(device=torch.device("cuda"), compile_mode="reduce-overhead"),
                 FP32_TOL, marks=cuda_only),
])
def test_training_step_matches_float64_on_the_cpu(float64_run, variant, kwargs, tol):
    loss_err, grad_err = errors(run_steps(states=float64_run[0], **kwargs), float64_run)
    print(f"{variant}: losses {loss_err:.1e} (tol {tol[0]:.0e}), gradients {grad_err:.1e} (tol {tol[1]:.0e})")
    assert loss_err <= tol[0] and grad_err <= tol[1], variant


def test_the_comparison_catches_a_step_whose_discriminators_see_the_last_steps_fakes(float64_run, monkeypatch):
    """What an overwritten CUDA-graph output would give the discriminators is far outside
    the fp32 tolerances."""
    last = {}

    def one_step_late(buffer, fakes):
        out = last.get(id(buffer), fakes.detach())
        last[id(buffer)] = fakes.detach().clone()
        return out

    monkeypatch.setattr(gan.ReplayBuffer, "push_and_pop", one_step_late)
    loss_err, grad_err = errors(run_steps(torch.device("cpu"), states=float64_run[0]), float64_run)
    assert loss_err > 100 * FP32_TOL[0] and grad_err > FP32_TOL[1]
