"""An uneven all-to-all and its gradient, the same code on every backend.

    HYPER_PARALLEL_PLATFORM=torch     python -m hyper_parallel.launch --nproc 4 examples/uneven_all_to_all.py
    HYPER_PARALLEL_PLATFORM=mindspore python -m hyper_parallel.launch --nproc 4 examples/uneven_all_to_all.py

Rank r sends ``(r + j) % 3`` rows to rank j (so some pairs exchange nothing). Every row carries its origin, so the
received rows can be checked exactly. The loss is ``sum(w * received)`` with ``w`` the row index on the receiver;
its gradient with respect to the sent rows is therefore the receiver's row index, routed back by the reverse
all-to-all. Both are checked against values computed on the host; the script exits 1 on any mismatch.
"""

from hyper_parallel import get_platform
from hyper_parallel.functional import all_to_all_single_autograd


def splits_for(rank: int, world: int) -> tuple[list[int], list[int]]:
    send = [(rank + j) % 3 for j in range(world)]
    recv = [(i + rank) % 3 for i in range(world)]
    return send, recv


def main() -> int:
    p = get_platform()
    p.init_process_group()
    rank, world = p.get_rank(), p.get_world_size()
    send, recv = splits_for(rank, world)

    # Row k of the rows sent to j holds 1000*rank + 10*j + k: its origin, destination and position.
    rows = [[1000.0 * rank + 10 * j + k] * 2 for j in range(world) for k in range(send[j])]
    x = p.tensor(rows, dtype="float32") if rows else p.zeros((0, 2))
    weights = p.tensor([[float(i)] * 2 for i in range(sum(recv))], dtype="float32") if sum(recv) else p.zeros((0, 2))

    def loss(t):
        return (all_to_all_single_autograd(t, output_split_sizes=recv, input_split_sizes=send) * weights).sum()

    value, (grad,), _ = p.value_and_grad(loss, [x])

    received = p.tolist(p.all_to_all_single(x, output_split_sizes=recv, input_split_sizes=send)[0])
    expected = [[1000.0 * i + 10 * rank + k] * 2 for i in range(world) for k in range(recv[i])]

    # Position of my k-th row for j inside j's receive buffer: rows from lower ranks come first.
    expected_grad = []
    for j in range(world):
        offset = sum(splits_for(i, world)[0][j] for i in range(rank))
        expected_grad += [[float(offset + k)] * 2 for k in range(send[j])]

    ok = received == expected and p.tolist(grad) == expected_grad
    print(f"rank {rank}: sent {send} received {recv} rows; loss {float(p.tolist(value)):.1f}; "
          f"values {'OK' if received == expected else 'WRONG'}; gradient {'OK' if ok else 'WRONG'}")
    p.destroy_process_group()  # leave together (rank 0 hosts the rendezvous store) and tear down cleanly
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
