from conftest import make_state, write_checkpoint
from hubserver import running_hub
from soup import merge
from soup.hub import ShardUploader
from soup.hub.push import _preuploaded

def test_dbg(tmp_path):
    a = write_checkpoint(tmp_path / "a", make_state(1, big=20_000))
    b = write_checkpoint(tmp_path / "b", make_state(2, big=20_000))
    with running_hub(lfs_threshold=2000) as store:
        up = ShardUploader("acme/lfs", endpoint=store.url)
        up.start()
        res = merge([a, b], tmp_path / "out", shard_size="20KB", on_shard=up.shard_done)
        for n, (op, st, f) in up._shards.items():
            f.result()
            print(n, _preuploaded(op), type(op.path_or_fileobj), op._is_uploaded, op._upload_mode)
        print([(m, r, s) for m, r, s in store.requests])
        up.finish(res.path)
        print([(m, r, s) for m, r, s in store.requests])
