"""The baseline, as the original notebook had it: PIL transforms in DataLoader workers, a teacher forward per
batch, `.item()` per step. Built from the same uint8 images as the harness, so both see the same data."""
from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from kd.losses.batch import Batch, Progress
from kd.taps import Outputs, TappedModel


class PILImages(Dataset):
    """A torchvision-style dataset over uint8 NCHW images: (transformed PIL image, int label, index) per index."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.hwc = images.cpu().permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels.cpu().tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.hwc[index])), self.labels[index], index


def loader(images: torch.Tensor, labels: torch.Tensor, mean, std, batch_size: int, workers: int, train: bool,
           seed: int, device: torch.device) -> DataLoader:
    """RandomCrop(the images' own size, padding=4) + RandomHorizontalFlip + ToTensor + Normalize for training; the
    last two else."""
    size = tuple(images.shape[-2:])
    augment = [transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip()] if train else []
    transform = transforms.Compose([*augment, transforms.ToTensor(), transforms.Normalize(mean, std)])
    return DataLoader(PILImages(images, labels, transform), batch_size=batch_size, shuffle=train,
                      num_workers=workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed))


def train_epoch(student: TappedModel, loss_fn, teacher: TappedModel | None, optimizer, batches,
                device: torch.device) -> dict:
    """One epoch of the notebook's loop: every step waits for the host (`.item()`), the teacher runs per batch."""
    student.train()
    loss_fn.train()
    running_loss, correct, seen = 0.0, 0, 0
    for step, (images, labels, indices) in enumerate(batches):
        done = torch.tensor((step + 1) / len(batches), device=device)  # on the device, as the harness gives it
        batch = Batch(images.to(device), labels.to(device), indices.to(device), Progress(0, step, len(batches), 1, done))
        loss, right = train_step(student, loss_fn, teacher, optimizer, batch)
        running_loss += loss * len(labels)
        correct += right
        seen += len(labels)
    return {"loss": running_loss / seen, "train_acc": correct / seen}


def train_step(student: TappedModel, loss_fn, teacher: TappedModel | None, optimizer, batch: Batch) -> tuple[float, int]:
    """One step as the notebook took it: the teacher's forward, the student's, backward, step, `.item()`."""
    with torch.no_grad():
        target = teacher(batch.images) if teacher is not None else None
    outputs: Outputs = student(batch.images)
    loss = loss_fn(outputs, target, batch).total
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item(), (outputs.logits.argmax(1) == batch.labels).sum().item()


def accuracy(student: TappedModel, batches, device: torch.device) -> float:
    student.eval()
    correct, seen = 0, 0
    with torch.no_grad():
        for images, labels, _ in batches:
            images, labels = images.to(device), labels.to(device)
            correct += (student(images).logits.argmax(1) == labels).sum().item()
            seen += len(labels)
    return correct / max(seen, 1)
