"""Tiny LRU models, data and TrainingArguments for the baseline tests."""

import torch


def tiny_config(**overrides):
    from compressm_hf.modeling.lru import LRUConfig

    kwargs = dict(
        input_size=1,
        num_labels=3,
        hidden_size=8,
        num_hidden_layers=2,
        state_size=8,
        classifier_pooling="mean",
        hidden_dropout=0.0,
    )
    kwargs.update(overrides)
    return LRUConfig(**kwargs)


def tiny_classifier(seed: int = 0, **overrides):
    from compressm_hf.modeling.lru import LRUForSequenceClassification

    torch.manual_seed(seed)
    return LRUForSequenceClassification(tiny_config(**overrides))


def tiny_dataset(n: int = 32, length: int = 12, seed: int = 0):
    import datasets

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, 1, generator=g)
    y = (x.mean(dim=(1, 2)) > 0).long() + (x[:, 0, 0] > 1).long()
    ds = datasets.Dataset.from_dict({"inputs_embeds": x.numpy(), "labels": y.numpy()})
    ds.set_format("torch")
    return ds


def training_args(tmp_path, max_steps: int = 4, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)
