"""The naive implementation `bench.naive` measures faceparse against: the model card's code in a Celery task.

Written the way a user would first write it: the model loaded at import, one image per task,
SegformerImageProcessor -> model -> F.interpolate -> argmax, PIL decode, PNG encode, boto3
get/put, a Redis result backend to wait on, and `celery -A bench.naive_tasks worker` with its
defaults (prefork, one child per core). Its outputs match faceparse's (mask.png, overlay.png,
summary.json), encoded the straightforward way (`bench.pipeline.reference_encode`).

Configured by NAIVE_BROKER_URL and NAIVE_MODEL; S3 by boto3's own AWS_* variables.
"""

from __future__ import annotations

import io
import os

import boto3
import torch
import torch.nn.functional as F
from celery import Celery
from PIL import Image
from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

from bench.pipeline import reference_encode

app = Celery("naive", broker=os.environ.get("NAIVE_BROKER_URL", "redis://localhost:6379/1"),
             backend=os.environ.get("NAIVE_BROKER_URL", "redis://localhost:6379/1"))

device = "cuda" if torch.cuda.is_available() else "cpu"
MODEL = os.environ.get("NAIVE_MODEL", "jonathandinu/face-parsing")
image_processor = SegformerImageProcessor.from_pretrained(MODEL)
model = SegformerForSemanticSegmentation.from_pretrained(MODEL)
model.to(device)
id2label = {int(k): v for k, v in model.config.id2label.items()}


@app.task
def parse_face(bucket: str, key: str) -> dict[str, int]:
    """Parse s3://bucket/key; write mask.png, overlay.png and summary.json under naive/<key>/."""
    s3 = boto3.client("s3")
    image = Image.open(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())).convert("RGB")
    inputs = image_processor(images=image, return_tensors="pt").to(device)
    with torch.no_grad():  # the card leaves this out; granted here, so the comparison is generous
        outputs = model(**inputs)
    logits = outputs.logits  # shape (batch_size, num_labels, ~height/4, ~width/4)
    # resize output to match input image dimensions
    upsampled_logits = F.interpolate(logits, size=image.size[::-1], mode="bilinear", align_corners=False)
    labels = upsampled_logits.argmax(dim=1)[0]
    mask = labels.cpu().numpy().astype("uint8")
    for name, body in reference_encode(image, mask, id2label).items():
        s3.put_object(Bucket=bucket, Key=f"naive/{key}/{name}", Body=body)
    return {"width": image.width, "height": image.height}
