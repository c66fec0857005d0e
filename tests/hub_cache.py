"""A huggingface_hub cache laid out by a test (the layout `hf download` leaves), for offline Hub tests."""
import hashlib
import os


def lay_out_hub_cache(cache, repo: str, filename: str, src: str):
  """cache/models--OWNER--NAME/{blobs/<sha256>, refs/main -> commit, snapshots/<commit>/filename}."""
  folder = cache / ('models--' + repo.replace('/', '--'))
  data = open(src, 'rb').read()
  blob = hashlib.sha256(data).hexdigest()
  commit = hashlib.sha1(repo.encode()).hexdigest()
  (folder / 'blobs').mkdir(parents=True)
  (folder / 'blobs' / blob).write_bytes(data)
  (folder / 'refs').mkdir()
  (folder / 'refs' / 'main').write_text(commit)
  (folder / 'snapshots' / commit).mkdir(parents=True)
  os.symlink(os.path.join('..', '..', 'blobs', blob), folder / 'snapshots' / commit / filename)
