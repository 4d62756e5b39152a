"""How the Ray executor sizes its actor pools: model actors leave room for a download task, GPU
stages share the GPUs in sets that fit a node, and pools grow with the cluster and their queue."""
from pipeline.core.stage import Resources
from pipeline.executors.ray import _Sizing

CPU_MODEL, GPU_A, GPU_B = Resources(cpus=1), Resources(cpus=1, gpus=1), Resources(cpus=1, gpus=0.5)


def node(cpus, gpus=0):
    return {"CPU": cpus, "GPU": gpus}


def test_cpu_actors_shrink_to_leave_one_download_task_room():
    sizing = _Sizing([CPU_MODEL, CPU_MODEL, CPU_MODEL], task_cpus=1, cpus=2)
    assert sizing.request(CPU_MODEL).cpus == 1 / 3
    assert _Sizing([CPU_MODEL], task_cpus=1, cpus=8).request(CPU_MODEL).cpus == 1


def test_two_gpu_stages_on_one_gpu_share_it_instead_of_waiting_forever():
    sizing = _Sizing([GPU_A, GPU_B], task_cpus=1, cpus=16)
    nodes = [node(16, 1)]
    assert sizing.pool(GPU_A, 0, [], node(16, 1), nodes, node(16, 1)) == 1
    assert sizing.request(GPU_A).gpus + sizing.request(GPU_B).gpus <= 1  # both fit on the one GPU


def test_gpu_pools_follow_the_gpu_nodes_as_they_join():
    sizing = _Sizing([GPU_A, GPU_B], task_cpus=1, cpus=16)
    one = [node(8), node(8, 4)]  # a CPU head and a 4-GPU worker: sets of 1.5 GPUs -> 2 per node
    assert sizing.pool(GPU_A, 0, [], {}, one, {}) == 2
    assert sizing.pool(GPU_A, 2, [0, 0], {}, one + [node(8, 4)], {}) == 4
    assert sizing.pool(GPU_A, 4, [0] * 4, {}, one, {}) == 4  # a node that left takes no actor down here


def test_a_cpu_pool_grows_only_when_every_actor_has_work_queued_and_cpus_are_left():
    sizing = _Sizing([CPU_MODEL], task_cpus=1, cpus=4)
    assert sizing.pool(CPU_MODEL, 0, [], node(4), [node(4)], node(4)) == 1
    sizing.request(CPU_MODEL)
    assert sizing.pool(CPU_MODEL, 1, [1], node(4), [node(4)], node(3)) == 1   # not queued enough
    assert sizing.pool(CPU_MODEL, 1, [2], node(4), [node(4)], node(3)) == 2   # queued, room left
    sizing.request(CPU_MODEL)
    sizing.request(CPU_MODEL)
    assert sizing.pool(CPU_MODEL, 3, [5, 5, 5], node(4), [node(4)], node(1)) == 3  # the last CPU stays for downloads
