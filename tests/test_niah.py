"""`ringserve niah`, the needle-in-a-haystack eval client (clients/ringserve/niah/).

Unit tests run against `WordClient`, a stand-in server whose tokenizer counts whitespace-separated
words, so every size and depth can be checked by hand. The end-to-end tests run the CLI against
the real server on the default model: its weights are random, so scores are near 0 and the tests
check the pipeline (sizes, depths, rows, resume, caches, plot), not recall.
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import random
import sys

import grpc
import pytest
from PIL import Image

import ringserve
from ringserve import cli, types
from ringserve.niah import haystack, plot, results, scoring, tasks
from ringserve.niah.command import parse_depths, parse_lengths
from ringserve.niah.runner import Grid, Runner, Settings
from ringserve.niah.sizing import Sizer, last_fitting

CLASSIC = tasks.Classic()
CLASSIC_SYSTEM = tasks.CLASSIC_SYSTEM


@pytest.fixture(autouse=True)
def niah_home(tmp_path, monkeypatch):
    """The stdlib haystack's cache goes to a temporary home, not the user's."""
    monkeypatch.setenv("RINGSERVE_HOME", str(tmp_path / "home"))


# ---- a server stand-in: one token per word -----------------------------------------------------

def words(text: str) -> int:
    return len(text.split())


class WordClient:
    """Enough of `ringserve.Client` for the runner: a prompt has 1 token (bos) + per turn
    2 + its words + the system instruction's words + 2 (the open model turn)."""

    def __init__(self, answer: str = "", input_token_limit: int = 100_000):
        self.answer = answer
        self.input_token_limit = input_token_limit
        self.calls: collections.Counter[str] = collections.Counter()
        self.caches: dict[str, tuple] = {}
        self.prompts: list[tuple[str | None, list]] = []  # (system, turns) of each generate
        self.fail_on_generate: int | None = None  # raise on this generate call (1-based)

    @staticmethod
    def tokens(turns, system: str | None) -> int:
        return 1 + sum(2 + words(text) for _, text in turns) + words(system or "") + 2

    def count_tokens(self, contents, system_instruction=None, *, cached_content=None) -> int:
        self.calls["count_tokens"] += 1
        return self.tokens(contents, system_instruction)

    def model_info(self) -> types.ModelInfo:
        self.calls["model_info"] += 1
        return types.ModelInfo("words", self.input_token_limit, self.input_token_limit - 1, 100,
                               ["TEXT"], 0, "float32")

    def create_cache(self, contents, *, system_instruction=None, ttl=None, display_name=""):
        self.calls["create_cache"] += 1
        name = f"cachedContents/{len(self.caches)}"
        self.caches[name] = (system_instruction, list(contents))
        return types.CachedContent(name, display_name, None, None, None,
                                   self.tokens(contents, system_instruction), 0)

    def update_cache(self, cache, *, ttl=None):
        self.calls["update_cache"] += 1
        return cache

    def delete_cache(self, cache) -> None:
        self.calls["delete_cache"] += 1
        del self.caches[types.cache_name(cache)]

    def generate_text(self, contents, *, system_instruction=None, cached_content=None,
                      max_output_tokens=None, temperature=None) -> types.Result:
        self.calls["generate_text"] += 1
        assert temperature == 0 and max_output_tokens
        if self.calls["generate_text"] == self.fail_on_generate:
            raise ringserve.Unavailable(grpc.StatusCode.UNAVAILABLE, "server went away")
        if cached_content is not None:
            system_instruction, cached = self.caches[types.cache_name(cached_content)]
            contents = cached + list(contents)
        self.prompts.append((system_instruction, list(contents)))
        n = self.tokens(contents, system_instruction)
        return types.Result(self.answer, "STOP", types.Usage(n, 3, 0, n + 3), 0.01, (), "")


def toy_haystack() -> haystack.Haystack:
    """40 sentences of 3 to 14 words, so boundaries fall unevenly in tokens."""
    rng = random.Random(7)
    sentences = [" ".join(["Word"] + ["word"] * rng.randint(2, 13)) + "." for _ in range(40)]
    return haystack.from_text("toy", " ".join(sentences))


def prompt_tokens(sizer: Sizer, context: tasks.Context, units: int) -> int:
    """F(units), counted here from scratch rather than through the sizer's memo."""
    text = sizer.render(context, units, sizer.place(context, units))
    return WordClient.tokens([("user", text), *context.questions[0].turns], context.system)


# ---- haystacks ---------------------------------------------------------------------------------

def test_split_units_keeps_sentences_whole():
    units = haystack.split_units("It works, e.g. here. Pi is 3.14 today!  Is it?\n\"Yes.\" Next\n"
                                 "line here.\n\nA new paragraph. End")
    assert units == ["It works, e.g. here. ", "Pi is 3.14 today! ", "Is it? ", "\"Yes.\" ",
                     "Next line here.\n\n", "A new paragraph. ", "End\n\n"]
    long = haystack.split_units("word " * 400)
    assert len(long) > 1 and all(len(u) <= haystack.MAX_UNIT_CHARS + 1 for u in long)
    assert "".join(long).split() == ["word"] * 400


def test_haystack_repeats_across_its_end():
    hay = haystack.from_text("abc", "A one. B two. C three.")
    assert hay.units == ("A one. ", "B two. ", "C three.\n\n")
    endless = list(itertools.islice(itertools.cycle(hay.units), 10))
    for start, stop in [(0, 3), (2, 4), (1, 10), (5, 7), (3, 3)]:
        assert hay.text(start, stop) == "".join(endless[start:stop])
    assert hay.units_for_chars(len("A one. B two. ")) == 2


def test_passkey_filler_is_the_papers():
    hay = haystack.passkey_filler()
    assert hay.text(0, 5).strip() == haystack.PASSKEY_FILLER
    assert hay.text(0, 10) == hay.text(0, 5) * 2  # one run of text, no paragraph breaks


def test_stdlib_haystack_is_cached_and_independent_of_this_process(tmp_path, monkeypatch):
    monkeypatch.setenv("RINGSERVE_HOME", str(tmp_path))
    first = haystack.stdlib()
    (cached,) = (tmp_path / "niah").glob("stdlib-*.json")
    assert len(first.units) > 2000 and sum(map(len, first.units)) > 200_000
    assert json.loads(cached.read_text())[0] in first.text(0, 40)
    # A docstring changed in this process does not reach the haystack: a fresh interpreter
    # walks the library.
    import textwrap
    monkeypatch.setattr(textwrap.dedent, "__doc__", "Patched docstring with enough words to "
                        "count as a paragraph of prose here.")
    rebuilt = haystack.stdlib(cache_dir=tmp_path / "fresh")
    assert rebuilt.units == first.units
    assert "Patched docstring" not in rebuilt.text(0, len(rebuilt.units))


def test_haystack_files(tmp_path):
    (tmp_path / "a.txt").write_text("First file. Two sentences.")
    (tmp_path / "b.txt").write_text("Second file.")
    hay = haystack.load([tmp_path / "a.txt", tmp_path / "b.txt"], "stdlib")
    assert hay.name == "a.txt, b.txt"
    assert hay.units == ("First file. ", "Two sentences.\n\n", "Second file.\n\n")
    assert haystack.load(None, "passkey").name == "passkey-filler"


# ---- searching, sizing and placing --------------------------------------------------------------

def test_last_fitting_finds_the_edge_from_any_guess():
    for edge, guess, hi in itertools.product([0, 1, 5, 37, 100], [0, 3, 36, 38, 90, 500],
                                             [None, 100]):
        probed = []

        def fits(x, edge=edge):
            probed.append(x)
            return x <= edge
        found = last_fitting(fits, guess, 0, hi)
        assert found == edge
        if hi is None or edge < hi:
            assert edge + 1 in probed  # the next one was seen not to fit
    assert last_fitting(lambda x: False, 10) is None
    assert last_fitting(lambda x: x <= 7, 7) == 7


@pytest.mark.parametrize("depth", [0, 10, 25, 33, 50, 75, 90, 100])
def test_needle_goes_at_the_sentence_boundary_nearest_its_depth(depth):
    hay = toy_haystack()
    sizer = Sizer(WordClient(), hay)
    (context,) = CLASSIC.contexts(300, [depth], 1)
    sized = sizer.size(context)
    (k,) = sized.boundaries
    needle = context.needles[0].text
    # At a boundary: the text before the needle is the intro and k whole units.
    assert sized.text.index(needle) == len(context.intro + hay.text(0, k))
    assert sized.text == (context.intro + hay.text(0, k) + needle + " "
                          + hay.text(k, sized.units)).rstrip() + context.outro
    # Nearest the depth, in haystack tokens: no other boundary is closer.
    depth_of = [words(hay.text(0, j)) for j in range(sized.units + 1)]
    target = depth / 100 * depth_of[-1]
    assert sized.haystack_tokens == depth_of[-1]
    assert sized.needle_tokens == (depth_of[k],)
    assert abs(depth_of[k] - target) == min(abs(d - target) for d in depth_of)


def test_prompt_is_sized_exactly_to_each_length():
    client = WordClient()
    sizer = Sizer(client, toy_haystack())
    contexts = [c for n in range(120, 700, 23) for c in CLASSIC.contexts(n, [0, 40, 100], 1)]
    sized = [sizer.size(context) for context in contexts]
    # Prefix counts are shared and searches start from good guesses: a few calls a prompt.
    assert client.calls["count_tokens"] <= 5 * len(contexts)
    for context, fitted in zip(contexts, sized):
        assert fitted.prompt_tokens == prompt_tokens(sizer, context, fitted.units) \
            <= context.length
        assert prompt_tokens(sizer, context, fitted.units + 1) > context.length  # one too many
        assert WordClient.tokens(fitted.contents(context.questions[0]),
                                 context.system) == fitted.prompt_tokens


def test_too_short_a_length_is_refused_with_a_reason():
    sizer = Sizer(WordClient(), toy_haystack())
    (context,) = CLASSIC.contexts(20, [50], 1)
    reason = sizer.size(context)
    assert isinstance(reason, str) and "length 20" in reason and "before any haystack" in reason


# ---- tasks ------------------------------------------------------------------------------------

def test_passkey_task():
    contexts = tasks.Passkey(seed=1).contexts(500, [0, 50], 2)
    assert len(contexts) == 4 and len({c.needles[0].text for c in contexts}) == 4
    for context in contexts:
        (question,) = context.questions
        (key,) = question.expected
        assert context.needles[0].text == f"The pass key is {key}. Remember it. {key} is the pass key."
        assert context.needles[0].depth == question.depth / 100
        assert question.turns == (("user", "What is the pass key?"), ("model", "The pass key is"))
    assert tasks.Passkey(seed=1).contexts(500, [0, 50], 2) == contexts  # seeded
    assert tasks.Passkey(seed=2).contexts(500, [0, 50], 2) != contexts


def test_multikey_task_asks_each_depths_own_needle():
    task = tasks.MultiKey(seed=3, distractors=2)
    depths = [0, 25, 50, 100]
    (context,) = task.contexts(2000, depths, 1)
    assert len(context.needles) == len(depths) + 2 and len(context.questions) == len(depths)
    keys = [n.text.split(" for ")[1].split(" is:")[0] for n in context.needles]
    assert len(set(keys)) == len(keys)
    for question in context.questions:
        needle = context.needles[question.needle]
        assert needle.depth == question.depth / 100
        (value,) = question.expected
        key = keys[question.needle]
        assert needle.text == f"One of the special magic numbers for {key} is: {value}."
        assert key in question.turns[0][1] and len(value) == 7
    asked = {q.needle for q in context.questions}
    assert asked == set(range(len(depths)))  # the 2 distractors are never asked
    # Sized, each asked needle sits at its depth's boundary.
    sized = Sizer(WordClient(), toy_haystack()).size(context)
    total = sized.haystack_tokens
    for question in context.questions:
        k = sized.boundaries[question.needle]
        # Within half a sentence (sentences have 3 to 14 words) of the depth.
        assert abs(sized.needle_tokens[question.needle] - question.depth / 100 * total) <= 7
        assert sized.text.count(context.needles[question.needle].text) == 1
        assert k <= sized.units
    assert len(task.contexts(2000, depths, 3)) == 3  # a context per trial


def test_multivalue_task():
    (context,) = tasks.MultiValue(seed=4, values=3).contexts(900, [75], 1)
    (question,) = context.questions
    assert len(context.needles) == 3 and len(set(question.expected)) == 3
    assert context.needles[0].depth == 0.75
    key = question.turns[0][1].split(" for ")[1].split(" mentioned")[0]
    assert [n.text for n in context.needles] == [
        f"One of the special magic numbers for {key} is: {v}." for v in question.expected]
    with pytest.raises(ValueError, match="multivalue expects 3"):
        tasks.check_scorer(tasks.MultiValue(values=3), "exact")


# ---- scoring ----------------------------------------------------------------------------------

def test_scorers():
    answer = CLASSIC.answer
    assert scoring.contains("The best thing: Eat a sandwich, and sit in DOLORES park on a "
                            "sunny day!", [answer]) == 1
    assert scoring.contains("Eat a sandwich in Dolores Park.", [answer]) == 0
    assert scoring.contains("1234567 and 7654321", ["1234567", "7654321", "1111111"]) == 2 / 3
    assert scoring.contains("12345678", ["1234567"]) == 0  # whole words only
    assert scoring.exact("Eat a sandwich and sit in Dolores Park on a sunny day.", [answer]) == 1
    assert scoring.exact("You should eat a sandwich and sit in Dolores Park on a sunny day",
                         [answer]) == 0
    assert scoring.first_integer(" 48213. Remember it, 11111", ["48213"]) == 1
    assert scoring.first_integer("It is 11111, not 48213", ["48213"]) == 0
    assert scoring.first_integer("no idea", ["48213"]) == 0
    with pytest.raises(ValueError):
        scoring.exact("x", ["a", "b"])


# ---- the runner: resume, caches, skips ---------------------------------------------------------

def run_grid(client, tmp_path, task=CLASSIC, grid=Grid((120, 200), (0, 50, 100)), **settings):
    settings = Settings(out=tmp_path / "results.jsonl", scorer=task.scorer,
                        max_output_tokens=8, **settings)
    logs: list[str] = []
    runner = Runner(client, task, toy_haystack(), settings, log=logs.append,
                    progress_stream=io.StringIO())
    return runner.run(grid), logs


def test_rows_and_resume_without_new_rpcs(tmp_path):
    client = WordClient(answer="Eat a sandwich and sit in Dolores Park on a sunny day.")
    rows, _ = run_grid(client, tmp_path)
    assert len(rows) == 6 and all(row["score"] == 1.0 for row in rows)
    saved = results.read_rows(tmp_path / "results.jsonl")
    assert saved == rows
    for row in saved:
        assert row["prompt_tokens"] <= row["length"]
        assert row["needle_depth_percent"] == pytest.approx(row["depth"], abs=12)
        assert {"latency_s", "answer", "needle_depth_tokens", "haystack_tokens"} <= set(row)
    assert client.calls["generate_text"] == 6
    # Ordered by the needle's place, so that prompts sharing a prefix run back to back.
    depths = [r["needle_depth_tokens"] for r in rows]
    assert depths == sorted(depths) and depths[:2] == [0, 0]

    again = WordClient()
    assert run_grid(again, tmp_path)[0] == []
    assert sum(again.calls.values()) == 0  # no RPC of any kind for done rows

    # Lose two rows (and tear the last line): only those are asked again.
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    third = WordClient()
    redone, _ = run_grid(third, tmp_path)
    assert third.calls["generate_text"] == 2
    assert {results.key(r) for r in redone} == {results.key(r) for r in rows[4:]}
    assert len(results.read_rows(tmp_path / "results.jsonl")) == 6


def test_named_cache_for_questions_sharing_a_context(tmp_path):
    client = WordClient()
    rows, _ = run_grid(client, tmp_path, grid=Grid((200,), (50,), trials=3))
    assert client.calls["create_cache"] == 1 and client.calls["delete_cache"] == 1
    assert [r["named_cache"] for r in rows] == [True] * 3 and not client.caches
    # The cached prompt is the same prompt: cache contents + question == the whole turns.
    (context,) = CLASSIC.contexts(200, [50], 3)
    sized = Sizer(WordClient(), toy_haystack()).size(context)
    assert client.prompts == [(CLASSIC_SYSTEM, sized.contents(context.questions[0]))] * 3

    single = WordClient()
    run_grid(single, tmp_path / "single")  # one question per context: no named cache
    assert single.calls["create_cache"] == 0

    flagged = WordClient()
    run_grid(flagged, tmp_path / "flag", grid=Grid((200,), (50,), trials=2), named_cache=False)
    assert flagged.calls["create_cache"] == 0 and flagged.calls["generate_text"] == 2



def test_named_cache_is_deleted_when_a_question_fails(tmp_path):
    client = WordClient()
    client.fail_on_generate = 2
    with pytest.raises(ringserve.Unavailable):
        run_grid(client, tmp_path, grid=Grid((200,), (50,), trials=3))
    assert client.calls["delete_cache"] == 1 and not client.caches
    assert len(results.read_rows(tmp_path / "results.jsonl")) == 1  # the answer it did get


def test_lengths_past_the_server_limit_are_skipped(tmp_path):
    client = WordClient(input_token_limit=180)
    rows, logs = run_grid(client, tmp_path)
    assert {r["length"] for r in rows} == {120}
    assert logs == ["skipping length 200: above the server's input_token_limit 180 minus 8 "
                    "output tokens"]


# ---- summary and heatmap -----------------------------------------------------------------------

def fake_rows() -> list[dict]:
    scores = {(1024, 0.0): [1.0], (1024, 50.0): [0.0, 1.0], (4096, 0.0): [0.0],
              (4096, 100.0): [1.0]}  # (1024, 100) and (4096, 50) have no answers
    return [{"task": "classic", "length": n, "depth": d, "trial": t, "score": s}
            for (n, d), ss in scores.items() for t, s in enumerate(ss)]


def test_summary_table():
    table = results.summary_table(fake_rows(), "niah classic")
    assert table.splitlines() == [
        "niah classic: mean score (depth % down, context length across)",
        "  depth    1k    4k",
        "      0  1.00  0.00",
        "     50  0.50     -",
        "    100     -  1.00",
        "   mean  0.67  0.50",
        "overall 0.600 over 5 answers",
    ]


def test_heatmap_png(tmp_path):
    path = tmp_path / "map.png"
    layout = plot.heatmap(fake_rows(), path, "niah classic")
    assert (layout.columns, layout.rows) == (2, 3)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == layout.size
        pixels = image.convert("RGB")
        expected = {(0, 0): plot.GREEN, (1, 0): plot.RED, (0, 1): plot.YELLOW,
                    (1, 1): plot.EMPTY, (0, 2): plot.EMPTY, (1, 2): plot.GREEN}
        for (column, row), rgb in expected.items():
            x0, y0, x1, y1 = layout.cell(column, row)
            assert pixels.getpixel((x0 + 4, y0 + 4)) == rgb  # a corner, clear of the label
            centre = [pixels.getpixel((x, (y0 + y1) // 2)) for x in range(x0, x1)]
            assert any(p != rgb for p in centre)  # the score is written in the cell
    assert plot.color(0.25) == tuple(round((a + b) / 2) for a, b in zip(plot.RED, plot.YELLOW))


def test_without_pillow_the_message_says_how_to_get_the_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now fails
    with pytest.raises(plot.PillowMissing, match=r"ringserve-client\[niah\]"):
        plot.heatmap(fake_rows(), tmp_path / "x.png", "t")
    out = tmp_path / "r.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in fake_rows()))
    assert cli.main(["niah", "--plot-only", "--out", str(out), "--heatmap",
                     str(tmp_path / "x.png")]) == 2
    assert "pip install 'ringserve-client[niah]'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_plot_only_writes_one_picture_per_task(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    rows = fake_rows() + [dict(r, task="passkey") for r in fake_rows()]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["niah", "--plot-only", "--out", str(out), "--heatmap",
                     str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p-classic.png").exists() and (tmp_path / "p-passkey.png").exists()
    assert capsys.readouterr().out.count("overall 0.600 over 5 answers") == 2
    assert cli.main(["niah", "--plot-only", "--out", str(out), "--task", "multikey"]) == 1
    assert "no multikey results in" in capsys.readouterr().err
    assert cli.main(["niah", "--trials", "0", "--out", str(out)]) == 2
    assert "trials must be >= 1" in capsys.readouterr().err


def test_length_and_depth_flags():
    assert parse_lengths("1k,4K,256,1.5k,1M") == (256, 1024, 1536, 4096, 1 << 20)
    assert parse_depths("100,0,50,50") == (0.0, 50.0, 100.0)
    for bad in ["1x", "", "-5"]:
        with pytest.raises(Exception):
            parse_lengths(bad)
    with pytest.raises(Exception):
        parse_depths("0,101")


# ---- end to end: the CLI against the real server ------------------------------------------------

def count_calls(monkeypatch, cls) -> collections.Counter[str]:
    """Counts calls of the client's RPC methods from now on (they still run)."""
    calls: collections.Counter[str] = collections.Counter()
    for name in ("generate_text", "count_tokens", "model_info", "create_cache"):
        method = getattr(cls, name)

        def counted(self, *args, _method=method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, counted)
    return calls


@pytest.fixture(scope="module")
def client(server_target):
    with ringserve.Client(server_target, timeout=120) as c:
        yield c


def test_sizing_is_exact_with_the_servers_tokenizer(client):
    sizer = Sizer(client, haystack.stdlib())
    for context in CLASSIC.contexts(400, [0, 60], 1) + tasks.MultiKey().contexts(400, [30], 1):
        sized = sizer.size(context)
        question = context.questions[0]
        assert client.count_tokens(sized.contents(question), context.system) \
            == sized.prompt_tokens <= 400
        more = sizer.render(context, sized.units + 1, sizer.place(context, sized.units + 1))
        assert client.count_tokens([("user", more), *question.turns], context.system) > 400


def test_cli_runs_resumes_and_plots(server_target, client, tmp_path, capsys, monkeypatch):
    out, png = tmp_path / "results.jsonl", tmp_path / "heat.png"
    limit = client.model_info().input_token_limit
    argv = ["niah", "--target", server_target, "--lengths", f"256,512,{limit}", "--depths",
            "0,50,100", "--max-output-tokens", "4", "--out", str(out), "--heatmap", str(png)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert (f"skipping length {limit}: above the server's input_token_limit {limit} minus 4 "
            "output tokens") in captured.err
    assert "niah classic [########################] 6/6" in captured.err
    rows = results.read_rows(out)
    assert sorted((r["length"], r["depth"]) for r in rows) == [
        (n, d) for n in (256, 512) for d in (0.0, 50.0, 100.0)]
    for row in rows:
        assert 0.8 * row["length"] < row["prompt_tokens"] <= row["length"]
        assert row["needle_depth_tokens"] == {0: 0, 100: row["haystack_tokens"]}.get(
            row["depth"], row["needle_depth_tokens"])
        assert 0 <= row["needle_depth_tokens"] <= row["haystack_tokens"]
        assert row["finish_reason"] in ("MAX_TOKENS", "STOP") and row["score"] in (0.0, 1.0)
        assert row["model"] == "ringserve-default" and row["haystack"] == "python-stdlib-docs"
    # Prompts sharing a prefix ran back to back: the server's prefix cache served some tokens.
    assert sum(r["cached_tokens"] for r in rows) > 0
    table = captured.out.splitlines()
    assert table[1].split() == ["depth", "256", "512"] and table[2].split()[0] == "0"
    with Image.open(png) as image:
        assert image.size == plot.Layout(2, 3).size

    # A second run asks the server nothing for the rows it has, and prints the same summary.
    # (The skipped length is still to do: a run that names it asks the server's limit again.)
    calls = count_calls(monkeypatch, ringserve.Client)
    assert cli.main([a.replace(f",{limit}", "") for a in argv]) == 0
    assert sum(calls.values()) == 0 and len(results.read_rows(out)) == 6
    assert "over 6 answers" in capsys.readouterr().out

    # multikey: one context, three questions: one named cache, deleted after.
    assert cli.main(["niah", "--target", server_target, "--task", "multikey", "--lengths",
                     "400", "--depths", "0,50,100", "--max-output-tokens", "4",
                     "--out", str(out)]) == 0
    multikey = [r for r in results.read_rows(out) if r["task"] == "multikey"]
    assert len(multikey) == 3 and all(r["named_cache"] for r in multikey)
    assert all(300 < r["prompt_tokens"] <= 400 for r in multikey)
    assert calls["create_cache"] == 1
    assert all(r["cached_tokens"] >= 256 for r in multikey)  # the pinned context's pages
    assert not [c for c in client.list_caches() if c.display_name.startswith("niah")]
