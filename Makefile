# Everything a fresh machine needs, from Python 3.11 and make alone.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Quiet TensorFlow's start-up chatter; seqio uses TF only for the input pipeline.
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: quickstart quickstart-rlhf quickstart-chat quickstart-e2wm quickstart-batgpt test bench bench-accelerator clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps t5==0.9.4  # the tests' metric reference (see pyproject.toml)
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/flanjax train --gin_file=configs/runs/quickstart.gin

# RLHF on top of the quickstart's SFT run: rubric feedback -> reward model -> PPO; DPO on the
# same comparisons; GRPO on the rubric itself -> one comparison table and summary.
RLHF_DIR := runs/quickstart_rlhf
LABEL    := $(VENV)/bin/flanjax label --policy runs/quickstart --task quickstart \
            --labeler rubric:tasks.quickstart_rlhf:rubric --max_new_tokens 16 --prompt_len 32
TIMED    := $(PY) -m tasks.quickstart_rlhf timed $(RLHF_DIR)
quickstart-rlhf: $(STAMP)
	$(MAKE) quickstart  # finishes a pre-empted quickstart run; a finished one says so and stops
	test -f $(RLHF_DIR)/preferences/train.jsonl || $(LABEL) --num_prompts 2000 --out $(RLHF_DIR)/preferences/train.jsonl
	test -f $(RLHF_DIR)/preferences/validation.jsonl || $(LABEL) --split validation --num_prompts 400 --seed 1 \
		--out $(RLHF_DIR)/preferences/validation.jsonl
	$(TIMED) reward $(VENV)/bin/flanjax train --gin_file=configs/runs/quickstart_rlhf_reward.gin
	$(TIMED) ppo $(VENV)/bin/flanjax train --gin_file=configs/runs/quickstart_rlhf_ppo.gin
	$(TIMED) dpo $(VENV)/bin/flanjax train --gin_file=configs/runs/quickstart_rlhf_dpo.gin
	$(TIMED) grpo $(VENV)/bin/flanjax train --gin_file=configs/runs/quickstart_rlhf_grpo.gin
	$(PY) -m tasks.quickstart_rlhf report

# Multi-turn SFT with LIMA's recipe from the quickstart's model: every reply trained vs the last only.
CHAT_DIR := runs/quickstart_chat
quickstart-chat: $(STAMP)
	$(MAKE) quickstart
	test -f $(CHAT_DIR)/base/model.gin || ( rm -rf $(CHAT_DIR)/hf $(CHAT_DIR)/base && \
		$(VENV)/bin/flanjax convert to-hf --in runs/quickstart --out $(CHAT_DIR)/hf && \
		$(VENV)/bin/flanjax convert from-hf --in $(CHAT_DIR)/hf --out $(CHAT_DIR)/base --add_tokens "<|eot|>" )
	$(VENV)/bin/flanjax train --gin_file=configs/runs/quickstart_chat.gin
	$(VENV)/bin/flanjax train --gin_file=configs/runs/quickstart_chat.gin --gin.MODEL_DIR="'$(CHAT_DIR)/last'" \
		--gin.MIXTURE_OR_TASK_NAME="'quickstart_chat_last'"
	$(PY) -m tasks.quickstart_chat report

# E2WM from the quickstart's model: household experiences (MCTS plans, exploration stories), then
# LoRA + EWC, plain LoRA and full fine-tuning, each evaluated on the world and on the quickstart.
E2WM_DIR := runs/quickstart_e2wm
E2WM     := $(VENV)/bin/flanjax train --gin_file=configs/runs/quickstart_e2wm.gin
quickstart-e2wm: $(STAMP)
	$(MAKE) quickstart
	test -f $(E2WM_DIR)/world/summary.json || $(VENV)/bin/flanjax world generate --out $(E2WM_DIR)/world \
		--homes 30 --seed 0 --simulations 500 --stories_per_home 6 --counting_steps 5 --path_sentences 6 10
	test -f runs/quickstart/fisher/fisher.json || $(VENV)/bin/flanjax fisher --run runs/quickstart --task quickstart \
		--num_examples 512 --inputs_length 40 --targets_length 24 --targets '^embed$$' 'attn/(q|k|v|o)$$' 'mlp/(gate|up|down)$$' 'lm_head$$'
	$(E2WM)
	$(E2WM) --gin.MODEL_DIR="'$(E2WM_DIR)/lora'" --gin.lm.train.ewc=None
	$(E2WM) --gin.MODEL_DIR="'$(E2WM_DIR)/full'" --gin.lm.train.ewc=None --gin.lm.train.lora=None \
		--gin.optim.OptimizerConfig.learning_rate=3e-3
	$(PY) -m tasks.e2wm.quickstart report

# BatGPT: the facts learned forward-only and bidirectionally (reverse questions), and the
# quickstart's model grown 2x in width and depth against the same size from scratch.
BATGPT_DIR := runs/quickstart_batgpt
BATGPT     := $(VENV)/bin/flanjax train --gin_file=configs/runs/quickstart_batgpt.gin
GROWN      := --d_model 256 --num_layers 8 --num_heads 8 --num_kv_heads 8 --d_ff 768
GROWTH     := $(VENV)/bin/flanjax train --gin_file=configs/runs/quickstart_batgpt_growth.gin
quickstart-batgpt: $(STAMP)
	$(MAKE) quickstart
	$(BATGPT)
	$(BATGPT) --gin.MODEL_DIR="'$(BATGPT_DIR)/forward_only'" --gin.bidirectional.Directions.r2l_weight=0.0
	test -d $(BATGPT_DIR)/grown/checkpoints/0 || $(VENV)/bin/flanjax grow --in runs/quickstart --out $(BATGPT_DIR)/grown $(GROWN)
	$(GROWTH) --gin_file=$(BATGPT_DIR)/grown/model.gin --gin.MODEL_DIR="'$(BATGPT_DIR)/grown_trained'"
	$(GROWTH) --gin.transformer.TransformerConfig.d_model=256 --gin.transformer.TransformerConfig.num_layers=8 \
		--gin.transformer.TransformerConfig.num_heads=8 --gin.transformer.TransformerConfig.num_kv_heads=8 \
		--gin.transformer.TransformerConfig.d_ff=768
	$(PY) -m tasks.batgpt report

# Two test processes (pytest-xdist): about 20 minutes on 2 cores.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# On a GPU or TPU host: JAX's plugin for the chip, then llama_1b's bfloat16 step, decoding and PPO.
bench-accelerator: $(STAMP)
	if command -v nvidia-smi >/dev/null; then $(PY) -m pip install --quiet -e ".[cuda]"; \
	elif ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1; then $(PY) -m pip install --quiet -e ".[tpu]"; fi
	$(PY) benchmarks/accelerator.py

bench: $(STAMP)
	$(PY) benchmarks/vs_torch.py train
	$(PY) benchmarks/vs_torch.py decode
	$(VENV)/bin/flanjax bench rank
	$(PY) benchmarks/loss_memory.py
	$(PY) benchmarks/hf_load.py --shape tinyllama
	$(VENV)/bin/flanjax bench ppo --model=bench_27m --batch_size=32 --prompt_len=64 --new_tokens=64

clean:
	rm -rf $(VENV) runs
