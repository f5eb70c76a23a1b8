"""PIL + torchvision counterpart of `datasets/examples/pipeline_bench.rs`: the same two pipelines through a
DataLoader with 2 worker processes. usage: python pipeline_torchvision.py IMAGENET_LIKE_DIR CIFAR_JPEG_DIR"""
import sys, time, random
import torch, torchvision
from torchvision import transforms as T

torch.set_num_threads(1)

class ScaleAug:
    """He et al.: shorter side uniform in [256, 480]."""
    def __call__(self, img):
        return T.functional.resize(img, random.randint(256, 480))

def measure(name, root, tf, min_images):
    ds = torchvision.datasets.ImageFolder(root, transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, num_workers=2, drop_last=False)
    n, t0 = 0, time.perf_counter()
    while n < min_images:
        for x, y in dl:
            n += x.shape[0]
    print(f"{name}: {n / (time.perf_counter() - t0):.0f} img/s ({n} images, 2 workers)")

imagenet = T.Compose([ScaleAug(), T.RandomCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
cifar = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                   T.Normalize([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])])
measure("imagenet scale-aug (PIL decode, resize [256,480], crop 224, flip)", sys.argv[1], imagenet, 400)
measure("cifar (PIL decode, pad 4, crop 32, flip)", sys.argv[2], cifar, 50000)
