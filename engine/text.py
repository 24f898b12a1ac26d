"""Text analysis of captions and prompts: the BM25 analysis chains (which one an index uses is recorded in its
manifest), and the text signals rankers compute for candidate captions: word-bigram (phrase) overlap, character
trigram similarity, caption keys for duplicate counting and the spans reports highlight. numpy and tantivy only.

Prompts are only ever *analysed* into tokens here, never parsed as query syntax.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Sequence

import numpy as np
import tantivy

from ._registry import Registry
from ._rows import distinct

# The English stop words of tantivy's (and Lucene's) stop-word filter.
STOPWORDS = frozenset("""a an and are as at be but by for if in into is it no not of on or such that the their then
there these they this to was will with""".split())
MAX_TOKEN_LEN = 40  # longer tokens (hashes, URLs run together) are dropped, as tantivy's remove_long(40)
WORD_CACHE = 200_000  # words whose analysis an Analyzer remembers (highlights); the memory is cleared beyond


# --------------------------------------------------------------------------------------------- analysis chains
@dataclass(frozen=True)
class TextChain:
    """One tantivy analysis chain: a tokenizer and filters. Captions are indexed and prompts analysed with the
    same chain; an index records the chain's name in its manifest and queries use that chain."""

    name: str  # registry name, recorded in the index manifest ("text": {"analyzer": name})
    tokenizer: str = "simple"  # "simple" (split on non-alphanumerics), "whitespace" or "trigram" (characters)
    lowercase: bool = True  # lower-case every token
    ascii_fold: bool = True  # fold accents and ligatures to ASCII (café -> cafe)
    stopwords: bool = False  # drop English stop words (STOPWORDS)
    stem: bool = True  # English (Snowball) stemmer: inflections share a term (runs, running -> run)
    tokenizer_name: str = ""  # the name the tantivy schema refers to (default: attrib_NAME)
    note: str = ""  # one line: what it is for

    @property
    def registered_as(self) -> str:
        return self.tokenizer_name or f"attrib_{self.name}"

    @property
    def description(self) -> str:
        """The pipeline in words, e.g. ``simple tokenizer | remove_long(40) | lowercase | english stemmer``."""
        parts = [{"simple": "simple tokenizer", "whitespace": "whitespace tokenizer",
                  "trigram": "character 3-gram tokenizer"}[self.tokenizer]]
        if self.tokenizer != "trigram":
            parts.append(f"remove_long({MAX_TOKEN_LEN})")
        parts += [p for p, on in (("lowercase", self.lowercase), ("ascii_fold", self.ascii_fold),
                                  ("english stopwords", self.stopwords), ("english stemmer", self.stem)) if on]
        return " | ".join(parts)

    @property
    def words(self) -> bool:
        """Whether tokens are words (phrases and highlights need words, not character n-grams)."""
        return self.tokenizer != "trigram"

    def build(self) -> "tantivy.TextAnalyzer":
        tok = {"simple": tantivy.Tokenizer.simple, "whitespace": tantivy.Tokenizer.whitespace,
               "trigram": lambda: tantivy.Tokenizer.ngram(3, 3, False)}[self.tokenizer]()
        b = tantivy.TextAnalyzerBuilder(tok)
        if self.tokenizer != "trigram":
            b = b.filter(tantivy.Filter.remove_long(MAX_TOKEN_LEN))
        if self.lowercase:
            b = b.filter(tantivy.Filter.lowercase())
        if self.ascii_fold:
            b = b.filter(tantivy.Filter.ascii_fold())
        if self.stopwords:
            b = b.filter(tantivy.Filter.stopword("english"))
        if self.stem:
            b = b.filter(tantivy.Filter.stemmer("english"))
        return b.build()


CHAINS: Registry[TextChain] = Registry("text analysis chain")
for _c in (
    TextChain("attrib_en", stopwords=True, tokenizer_name="attrib_en",
              note="the engine's chain before issue 9: stop words dropped (indexes built then record its pipeline)"),
    TextChain("en_stem", ascii_fold=False, note="tantivy's default en_stem tokenizer"),
    TextChain("en_stem_fold", note="en_stem with accents folded: keeps stop words (the default)"),
    TextChain("en_fold", stem=False, note="no stemming, no stop words"),
    TextChain("en_fold_stop", stem=False, stopwords=True, note="stop words dropped, no stemming"),
    TextChain("en_ws_stem", tokenizer="whitespace", note="whitespace tokens (punctuation kept inside tokens)"),
    TextChain("trigram", tokenizer="trigram", stem=False, note="character 3-grams (robust to typos, slow)"),
):
    CHAINS.register(_c.name, _c)

DEFAULT_CHAIN = "en_stem_fold"
# What indexes built before chains had names recorded in their manifest's "text" entry.
LEGACY_DESCRIPTIONS = {CHAINS.get("attrib_en").description: "attrib_en"}


def get_chain(name: str | None = None) -> TextChain:
    """The chain ``name`` (default: :data:`DEFAULT_CHAIN`); a pipeline description written by older indexes
    resolves to its chain. Unknown names fail with the valid ones."""
    if name is None:
        return CHAINS.get(DEFAULT_CHAIN)
    return CHAINS.get(LEGACY_DESCRIPTIONS.get(name, name))


@lru_cache(maxsize=1)
def _plain_words() -> "tantivy.TextAnalyzer":
    return (tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple()).filter(tantivy.Filter.lowercase())
            .filter(tantivy.Filter.ascii_fold()).build())


class Analyzer:
    """A chain's analyzer plus what the text signals need from it: prompt terms, token sequences of many captions
    at once, and which tokens are stop words."""

    SENTINEL = "7zq7sep7qz7"  # survives every word chain unchanged; separates captions analysed in one call

    def __init__(self, chain: TextChain | str | None = None) -> None:
        self.chain = chain if isinstance(chain, TextChain) else get_chain(chain)
        self.analyzer = self.chain.build()
        # highlights need words: a character chain borrows the default word chain
        self._words = self.analyzer if self.chain.words else get_chain(DEFAULT_CHAIN).build()
        self._word_cache: dict[str, list[str]] = {}

    @cached_property
    def stop_terms(self) -> frozenset[str]:
        """Stop words as this chain's word analysis spells them (e.g. stemmed)."""
        return frozenset(t for w in STOPWORDS for t in self._words.analyze(w))

    def terms(self, text: str | None, limit: int = 256) -> list[str]:
        """Distinct analysed terms of ``text`` in first-seen order (at most ``limit``). A text whose every word is
        a stop word has no terms: it carries no evidence about any caption."""
        if not text or not text.strip():
            return []
        seen: dict[str, None] = {}
        for t in self.analyzer.analyze(text):
            seen.setdefault(t, None)
            if len(seen) >= limit:
                break
        if not self.has_content(text):
            return []
        return list(seen)

    def words(self, text: str | None) -> list[str]:
        """The analysed word tokens of ``text`` in order, repeats kept (phrases)."""
        return self._words.analyze(text) if text and text.strip() else []

    def has_content(self, text: str) -> bool:
        """Whether ``text`` has a word that is not a stop word (whatever the chain's tokens look like)."""
        return any(t not in STOPWORDS for t in _plain_words().analyze(text))

    def analyze_words(self, words: Sequence[str]) -> list[list[str]]:
        """:meth:`words` of each single word, remembered across calls (tantivy's stemmer is slow per word; the
        words of captions shown to people repeat from query to query)."""
        cache = self._word_cache
        got = {w: cache[w] for w in set(words) if w in cache}
        miss = [w for w in set(words) if w not in got]
        if miss:
            if len(cache) > WORD_CACHE:
                cache.clear()
            for w, toks in zip(miss, self.words_of_many(miss)):
                got[w] = cache[w] = toks
        return [got[w] for w in words]

    def words_of_many(self, texts: Sequence[str]) -> list[list[str]]:
        """:meth:`words` of each text, analysed in one call (the texts joined by a sentinel token)."""
        if not texts:
            return []
        s = self.SENTINEL
        toks = self._words.analyze(f" {s} ".join(t or "" for t in texts))
        out: list[list[str]] = [[]]
        for t in toks:
            if t == s:
                out.append([])
            else:
                out[-1].append(t)
        if len(out) != len(texts):  # a text contained the sentinel itself: analyse one by one
            return [self.words(t) for t in texts]
        return out


# --------------------------------------------------------------------------------------------- text signals
MAX_TEXT_CHARS = 1000  # characters of a prompt or caption the phrase and trigram signals read (bounds their cost)
_COMBINING = re.compile(r"[\u0300-\u036f]")
_WORDCH = np.zeros(256, bool)  # bytes of word characters: ASCII letters and digits, and any byte of a non-ASCII one
_WORDCH[ord("0"):ord("9") + 1] = True
_WORDCH[ord("a"):ord("z") + 1] = True
_WORDCH[0x80:] = True
_KEEP = _WORDCH.copy()  # what the trigram signal keeps: word characters and the separator between texts
_KEEP[ord("\n")] = True
_VOWELS = np.zeros(256, bool)
_VOWELS[[ord(c) for c in "aeiouy"]] = True
_P = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible modulo 2**64: the rolling hash of word bytes
_P_INV = np.uint64(pow(int(_P), -1, 2 ** 64))


@lru_cache(maxsize=4)
def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P**k and P**-k modulo 2**64 for k < n (n rounded up to a power of two so few tables are made)."""
    with np.errstate(over="ignore"):
        p = np.concatenate([[np.uint64(1)], np.cumprod(np.full(n - 1, _P, np.uint64))])
        q = np.concatenate([[np.uint64(1)], np.cumprod(np.full(n - 1, _P_INV, np.uint64))])
    return p, q


def _member(a: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Boolean mask: which values of ``a`` are in ``sorted_set`` (sorted, distinct)."""
    if len(sorted_set) == 0:
        return np.zeros(len(a), bool)
    pos = np.minimum(np.searchsorted(sorted_set, a), len(sorted_set) - 1)
    return sorted_set[pos] == a


def fold(text: str) -> str:
    """Lower-case, accents removed (NFKD without combining marks)."""
    if text.isascii():  # nothing to decompose (most captions): the same result, ten times faster
        return text.lower()
    return _COMBINING.sub("", unicodedata.normalize("NFKD", text.lower()))


class TextBatch:
    """Several texts (a prompt, or the captions of a candidate pool) folded (:func:`fold`) and tokenized once, as
    numpy arrays, for the phrase and trigram signals: one join, one encode, then vectorised work only (tantivy's
    stemmer costs ~2 us per word, too much for 400 captions per query). Words are runs of letters and digits;
    stop words are dropped; the rest are light-stemmed (-ing/-ed, -s, -e, -y/-i stripped: horses, horse ->
    hors; running, runs -> run) and hashed."""

    def __init__(self, texts: Sequence[str | None]) -> None:
        self.n = len(texts)
        joined = fold("\n".join((t or "")[:MAX_TEXT_CHARS].replace("\n", " ") for t in texts))
        self.bytes = np.frombuffer(joined.encode("utf-8"), np.uint8)

    @cached_property
    def _words(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(hash of each word, its stem's hash, its text index), in text order, stop words included."""
        b = self.bytes
        w = _WORDCH[b]
        edge = np.diff(np.concatenate([[False], w, [False]]).astype(np.int8))
        s, e = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
        seg = np.cumsum(b == 10)[s] if len(s) else np.zeros(0, np.int64)
        n = 1 << max(10, int(len(b) + 1).bit_length())
        pk, qk = _powers(n)
        with np.errstate(over="ignore"):
            h = np.concatenate([[np.uint64(0)], np.cumsum(b.astype(np.uint64) * pk[:len(b)])])

            def hashes(end: np.ndarray) -> np.ndarray:
                return (h[end] - h[s]) * qk[s] + (end - s).astype(np.uint64)

            return hashes(e), hashes(_light_stem(b, s, e)), seg

    def content_stems(self) -> tuple[np.ndarray, np.ndarray]:
        """(stem hash, text index) of each non-stop word, in order."""
        raw, stem, seg = self._words
        keep = ~_member(raw, _stop_hashes())
        return stem[keep], seg[keep]

    @cached_property
    def _trigrams(self) -> tuple[np.ndarray, np.ndarray]:
        return self._make_trigrams()

    def trigrams(self) -> tuple[np.ndarray, np.ndarray]:
        """(codes, text index) of every character 3-gram, made once (:meth:`_make_trigrams`)."""
        return self._trigrams

    def _make_trigrams(self) -> tuple[np.ndarray, np.ndarray]:
        """(codes, text index) of every character 3-gram with everything but letters and digits removed, spaces
        included: "fire place" and "fireplace" have the same trigrams, and a typo changes only the three trigrams
        around it. Codes are 24-bit (three UTF-8 bytes)."""
        c = self.bytes[_KEEP[self.bytes]]
        if len(c) < 3:
            return np.zeros(0, np.uint32), np.zeros(0, np.int64)
        sep = c == 10
        seg = np.cumsum(sep)
        c32 = c.astype(np.uint32)
        codes = (c32[:-2] << 16) | (c32[1:-1] << 8) | c32[2:]
        ok = ~(sep[:-2] | sep[1:-1] | sep[2:])
        return codes[ok], seg[:-2][ok].astype(np.int64)


def _light_stem(b: np.ndarray, s: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Ends of the words [s, e) of ``b`` after stripping -ing/-ed (and a doubled consonant before them), then -s
    (not -ss), then -e, then -y/-i, each only from words that keep at least three letters."""
    e = e.copy()
    long = np.flatnonzero(e - s >= 4)  # shorter words keep every letter: only the others are looked at
    ls, le = s[long], e[long]

    def last(k: int) -> np.ndarray:
        return b[le - k]  # le - k >= ls for every k used below (each rule checks the length first)

    n = le - ls
    ing = (n >= 6) & (b[le - 3] == ord("i")) & (b[le - 2] == ord("n")) & (b[le - 1] == ord("g"))
    le -= 3 * ing
    ed = ~ing & (n >= 5) & (b[le - 2] == ord("e")) & (b[le - 1] == ord("d"))
    le -= 2 * ed
    c1 = last(1)
    le -= (ing | ed) & (le - ls >= 4) & (c1 == last(2)) & ~_VOWELS[c1] & (c1 >= ord("a"))
    c1 = last(1)
    le -= (le - ls >= 4) & (c1 == ord("s")) & (last(2) != ord("s"))
    le -= (le - ls >= 4) & (last(1) == ord("e"))
    c1 = last(1)
    le -= (le - ls >= 4) & ((c1 == ord("y")) | (c1 == ord("i")))
    e[long] = le
    return e


@lru_cache(maxsize=1)
def _stop_hashes() -> np.ndarray:
    return distinct(TextBatch([" ".join(sorted(STOPWORDS))])._words[0])


DENSE_TRIGRAM_CELLS = 1 << 22  # trigram overlap counts (captions x prompt trigrams) up to this via a dense table
ORDER_WINDOW = 4  # phrase order: a prompt bigram counts when its second word follows within this many caption words


def phrase_similarity(prompt: TextBatch, captions: TextBatch) -> tuple[np.ndarray, np.ndarray]:
    """Order-aware overlap of content words (stop words skipped, so "man in the hat" gives (man, hat)) between
    a prompt and each caption, two values in [0, 1]:

    * phrase: Dice overlap of consecutive word pairs (bigrams), 2|P ∩ C| / (|P| + |C|), P the prompt's distinct
      bigrams and |C| the caption's bigram count: the same words in another order share no bigram;
    * order: the share of P found in the caption in the same order with at most ``ORDER_WINDOW - 1`` caption
      words between them: a prompt that leaves words out keeps its order.

    Both NaN for every caption when the prompt has fewer than two content words."""
    n = captions.n
    ph, _ = prompt.content_stems()
    if len(ph) < 2:
        nan = np.full(n, np.nan, np.float32)
        return nan, nan.copy()
    vocab = distinct(ph)
    v = len(vocab)
    pid = np.searchsorted(vocab, ph)
    wanted = np.zeros(v * v, bool)  # the prompt's bigrams as (first word, second word) cells of a v x v table
    wanted[pid[:-1] * v + pid[1:]] = True
    n_p = int(wanted.sum())
    ch, cseg = captions.content_stems()
    n_bigrams = np.maximum(np.bincount(cseg, minlength=n) - 1, 0)
    # only caption words that are prompt words can make a shared pair: keep them with their positions
    at = np.minimum(np.searchsorted(vocab, ch), v - 1)
    keep = np.flatnonzero(vocab[at] == ch)
    cid, pos, seg = at[keep], keep, cseg[keep]
    keys, segs, gaps = [], [], []
    for k in range(1, ORDER_WINDOW + 1):  # the k-th next prompt word in the caption, up to ORDER_WINDOW away
        if len(cid) <= k:
            break
        gap = pos[k:] - pos[:-k]
        key = cid[:-k] * v + cid[k:]
        ok = (seg[k:] == seg[:-k]) & (gap <= ORDER_WINDOW) & wanted[key]
        keys.append(key[ok])
        segs.append(seg[k:][ok])
        gaps.append(gap[ok])
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    sg = np.concatenate(segs) if segs else np.zeros(0, np.int64)
    gp = np.concatenate(gaps) if gaps else np.zeros(0, np.int64)
    both = distinct(sg * (v * v) + key)
    order = np.bincount(both // (v * v), minlength=n) / n_p
    adjacent = distinct(sg[gp == 1] * (v * v) + key[gp == 1])
    inter = np.bincount(adjacent // (v * v), minlength=n)
    dice = 2.0 * inter / (n_p + n_bigrams)
    return dice.astype(np.float32), order.astype(np.float32)


def trigram_similarity(prompt: TextBatch, captions: TextBatch) -> tuple[np.ndarray, np.ndarray]:
    """Overlap of the character trigrams (:meth:`TextBatch.trigrams`) of a prompt and each caption, robust to
    typos, inflections and words joined or split; two values in [0, 1]: the Dice overlap 2|Q ∩ C| / (|Q| + |C|)
    (Q the prompt's distinct trigrams, |C| the caption's trigram count), and the share of Q the caption has,
    |Q ∩ C| / |Q| (a prompt that leaves words out is still covered). Both NaN for every caption when the prompt
    has no trigram."""
    n = captions.n
    qset = distinct(prompt.trigrams()[0])
    if len(qset) == 0 or n == 0:
        nan = np.full(n, np.nan if len(qset) == 0 else 0.0, np.float32)
        return nan, nan.copy()
    codes, seg = captions.trigrams()
    n_cap = np.bincount(seg, minlength=n)
    idx = _trigram_index(qset, codes)  # position of each caption trigram in the prompt's (-1: not there)
    q = len(qset)
    if n * q <= DENSE_TRIGRAM_CELLS:
        seen = np.zeros(n * q + 1, bool)  # which of the prompt's trigrams each caption has (+ one unused cell)
        seen[np.where(idx >= 0, seg * q + idx, n * q)] = True
        inter = np.count_nonzero(seen[:-1].reshape(n, q), axis=1)
    else:  # very many captions: the distinct (caption, trigram) pairs by a sort instead
        hit = idx >= 0
        pairs = distinct(seg[hit] * q + idx[hit])
        inter = np.bincount(pairs // q, minlength=n)
    return (2.0 * inter / (len(qset) + n_cap)).astype(np.float32), (inter / len(qset)).astype(np.float32)


def _trigram_index(qset: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """For each 24-bit trigram code, its position in the sorted distinct codes ``qset`` (-1 when absent), by
    two table lookups: the first two bytes pick a row (a 65,536-entry table; absent ones an all -1 row), the
    third byte a column of it."""
    lead = (qset >> 8).astype(np.intp)
    leads = distinct(lead)
    rows = np.full(1 << 16, len(leads), np.intp)  # the last row of the table stands for every absent lead
    rows[leads] = np.arange(len(leads))
    table = np.full((len(leads) + 1, 256), -1, np.int32)
    table[np.searchsorted(leads, lead), (qset & 0xFF).astype(np.intp)] = np.arange(len(qset), dtype=np.int32)
    return table.ravel()[rows[codes >> 8] * 256 + (codes & 0xFF)]


# --------------------------------------------------------------------------------------------- duplicates
_WORD = re.compile(r"\w+")


def caption_key(caption: str | None) -> int:
    """A 63-bit key shared by captions with the same words, ignoring case, accents, punctuation, repeats and word
    order ("Red Mums - Throw Pillow" = "throw pillow, red mums"); 0 for a caption without words."""
    words = sorted(set(_WORD.findall(fold(caption or ""))))
    if not words:
        return 0
    h = hashlib.blake2b(" ".join(words).encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(h, "little") >> 1) or 1


# --------------------------------------------------------------------------------------------- highlights
def content_bigrams(tokens: Sequence[str], stop: frozenset[str]) -> set[tuple[str, str]]:
    """Pairs of consecutive content tokens (stop words skipped)."""
    c = [t for t in tokens if t not in stop]
    return set(zip(c, c[1:]))


def shared_text(prompt: str | None, captions: Sequence[str | None], analyzer: Analyzer) -> list[dict]:
    """What each caption shares with the prompt, for people: ``words`` (caption words whose analysed term the
    prompt has, stop words excluded), ``phrases`` (runs of two or more such words that follow each other in the
    prompt too, stop words between them allowed) and ``spans``: [start, end, "word" | "phrase"] character offsets
    into the caption, sorted by start (a phrase span covers the word spans inside it). Every caption word is
    analysed in one call."""
    p_words = analyzer.words(prompt)
    stop = analyzer.stop_terms
    p_terms = {t for t in p_words if t not in stop}
    caps = [c or "" for c in captions]
    if not p_terms:
        return [{"words": [], "phrases": [], "spans": []} for _ in caps]
    p_bigrams = content_bigrams(p_words, stop)
    matches = [list(_WORD.finditer(c)) for c in caps]
    flat = [m.group(0) for ms in matches for m in ms]
    analysed = analyzer.analyze_words(flat)
    out, k = [], 0
    for cap, ms in zip(caps, matches):
        items = []  # (start, end, word, content terms) of the caption's content words
        for m in ms:
            terms = [t for t in analysed[k] if t not in stop]
            k += 1
            if terms:
                items.append((m.start(), m.end(), m.group(0), terms))
        words: list[str] = []
        spans: list[list] = []
        phrases: list[str] = []
        for s_, e, w, terms in items:
            if any(t in p_terms for t in terms):
                spans.append([s_, e, "word"])
                if w.lower() not in {x.lower() for x in words}:
                    words.append(w)
        run: list[int] = []
        for i in range(len(items) + 1):
            if i < len(items) and run and (items[run[-1]][3][-1], items[i][3][0]) in p_bigrams:
                run.append(i)
                continue
            if len(run) >= 2:
                s_, e = items[run[0]][0], items[run[-1]][1]
                phrases.append(cap[s_:e])
                spans.append([s_, e, "phrase"])
            run = [i]
        spans.sort(key=lambda x: (x[0], 0 if x[2] == "phrase" else 1))
        out.append({"words": words, "phrases": phrases, "spans": spans})
    return out
