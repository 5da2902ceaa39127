"""Needle-in-a-haystack evals against a ringserve server (`ringserve niah`).

One module a job: `haystack` (the text, cut into sentences), `tasks` (needles, questions and
expected answers of classic, passkey, multikey and multivalue), `sizing` (fitting a prompt to a
token length with CountTokens and placing needles), `scoring`, `runner` (the grid against a
server), `results` (the JSON-lines file and summary table), `progress`, `plot` (the heatmap,
with the optional Pillow) and `command` (the CLI flags).

Video and audio (`--modality`): `media_tasks` (the secret word, per duration, depth and trial),
`media_runner` (build, upload, count, ask, delete, per cell), `frames` (the needle frame and
generated pictures), `video` and `audio` (the haystack builders), `ffmpeg` (the bundled ffmpeg as
pipes) and `deps` (the optional packages they need, which nothing else here imports).

    from ringserve import Client
    from ringserve.niah import Grid, Runner, Settings, haystack, tasks

    with Client("127.0.0.1:50051") as client:
        task = tasks.Classic()
        runner = Runner(client, task, haystack.stdlib(),
                        Settings(out="niah.jsonl", scorer="contains", max_output_tokens=48))
        rows = runner.run(Grid(lengths=(1024, 4096), depths=(0, 50, 100)))
"""

from ringserve.niah.runner import Grid, Runner, Settings

__all__ = ["Grid", "Runner", "Settings"]
