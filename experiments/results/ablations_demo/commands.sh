# Run from /work/main; written by python -m alexnet_jax.tools.sweep --sweep=experiments/ablations.py:demo
python main.py --workdir=experiments/results/ablations_demo/baseline --config=experiments/demo.py
python main.py --workdir=experiments/results/ablations_demo/no_lrn --config=experiments/demo.py --config.model.lrn.enabled=False
python main.py --workdir=experiments/results/ablations_demo/non_overlapping_pool --config=experiments/demo.py --config.model.pool_window=2 --config.model.pool_stride=2
python main.py --workdir=experiments/results/ablations_demo/one_tower --config=experiments/demo.py --config.model.towers=1 --config.mesh.model=1 '--config.model.conv_features=(16,32,48,48,64)'
python main.py --workdir=experiments/results/ablations_demo/with_dropout --config=experiments/demo.py --config.model.dropout_rate=0.5
python main.py --workdir=experiments/results/ablations_demo/tanh --config=experiments/demo.py --config.model.activation=tanh
