# Two commands on a fresh machine:  make demo  |  make test   (each creates .venv if missing)
PY := .venv/bin/python
export PYTHONHASHSEED := 0

.PHONY: install demo demo-classification demo-dino demo-mask-rcnn demo-mask2former test benchmark clean

install: .venv/.installed

.venv/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

# the demo backbone: the classification demo's FocalNet, pretrained on the shapes (as ImageNet is for COCO)
DEMO_BACKBONE := runs/demo_classification/focalnet_shapes_backbone.safetensors

# the main job: pretrain the small FocalNet on shape classification, then train DINO detection with it
demo: demo-classification demo-dino

demo-classification: install
	$(PY) cli.py fit --config configs/demo/classification_shapes.yaml
	$(PY) cli.py test --config configs/demo/classification_shapes.yaml --ckpt_path best
	$(PY) cli.py export --config configs/demo/classification_shapes.yaml --ckpt_path best --output $(DEMO_BACKBONE)

$(DEMO_BACKBONE):
	$(MAKE) demo-classification

demo-dino: install $(DEMO_BACKBONE)
	$(PY) cli.py fit --config configs/demo/dino_shapes.yaml
	$(PY) cli.py test --config configs/demo/dino_shapes.yaml --ckpt_path best

demo-mask-rcnn: install $(DEMO_BACKBONE)
	$(PY) cli.py fit --config configs/demo/mask_rcnn_shapes.yaml
	$(PY) cli.py test --config configs/demo/mask_rcnn_shapes.yaml --ckpt_path best

demo-mask2former: install $(DEMO_BACKBONE)
	$(PY) cli.py fit --config configs/demo/mask2former_shapes.yaml
	$(PY) cli.py test --config configs/demo/mask2former_shapes.yaml --ckpt_path best

test: install
	$(PY) -m pytest -q

benchmark: install
	$(PY) benchmarks/backbone.py

clean:
	rm -rf runs lightning_logs .pytest_cache
