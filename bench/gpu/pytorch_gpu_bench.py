"""PyTorch training throughput on one CUDA GPU, for ratios against `resnet-infer bench --train --device cuda:0`.

usage: python pytorch_gpu_bench.py CASE [--seconds S] [--amp]
cases: train-cifar20 (ResNet-20, batch 128, 32x32), train-r50 (torchvision ResNet-50, batch 128, 224x224);
SGD momentum 0.9, weight decay 1e-4, float32 unless --amp (bf16 autocast).
Needs cifar_ref.py (../shared/reference) beside it or on PYTHONPATH. Prints: CASE img/s=<float> gpu=<name>
"""
import argparse, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, torchvision
from cifar_ref import CifarResNet

ap = argparse.ArgumentParser()
ap.add_argument("case"); ap.add_argument("--seconds", type=float, default=15); ap.add_argument("--amp", action="store_true")
a = ap.parse_args()
torch.manual_seed(0)
torch.backends.cudnn.benchmark = True
dev = torch.device("cuda:0")
if a.case == "train-cifar20": model, bs, hw, classes = CifarResNet(20), 128, 32, 10
elif a.case == "train-r50": model, bs, hw, classes = torchvision.models.resnet50(), 128, 224, 1000
else: sys.exit(f"unknown case {a.case}")
model = model.to(dev).train()
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
x = torch.randn(bs, 3, hw, hw, device=dev); y = torch.randint(0, classes, (bs,), device=dev)

def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.amp):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()

for _ in range(5): step()
torch.cuda.synchronize()
t0 = time.perf_counter(); k = 0
while time.perf_counter() - t0 < a.seconds or k < 5:
    step(); k += 1
torch.cuda.synchronize()
dt = time.perf_counter() - t0
print(f"{a.case}{'-bf16' if a.amp else ''} img/s={k * bs / dt:.1f} gpu={torch.cuda.get_device_name(0)}")
