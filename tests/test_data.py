"""Rating loaders, id maps and splits, on small files the tests write."""

import numpy as np
import pytest

from mf_ext.data import IdMap, Ratings, as_ratings, guess_format, kfold, load_ratings, train_test_split


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_u_data(tmp_path):
    path = write(tmp_path, "u.data", "196\t242\t3\t881250949\n186\t302\t3.5\t891717742\n")
    data = load_ratings(path)
    assert data.users.tolist() == [196, 186] and data.items.tolist() == [242, 302]
    assert data.ratings.tolist() == [3.0, 3.5] and data.users.dtype == np.int64


def test_ratings_dat(tmp_path):
    path = write(tmp_path, "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
    data = load_ratings(path)
    assert data.items.tolist() == [1193, 661] and data.ratings.tolist() == [5.0, 3.0]


def test_ratings_csv_with_header_and_string_ids(tmp_path):
    path = write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\nalice,m1,4.5,1\nbob,m2,2,2\n\n")
    data = load_ratings(path)
    assert data.users.tolist() == ["alice", "bob"] and data.items.tolist() == ["m1", "m2"]
    assert data.ratings.tolist() == [4.5, 2.0]


def test_tsv_whitespace(tmp_path):
    path = write(tmp_path, "r.tsv", "user item rating\n1 2 3\n# a comment\n4 5 1\n")
    assert load_ratings(path).ratings.tolist() == [3.0, 1.0]


# A csv/tsv header is told by its rating field (the third) not being a number: string ids in
# the first two fields are data, and a header-less file must keep its first rating.
@pytest.mark.parametrize("name, text, users, items, ratings", [
    ("r.csv", "alice,m1,4.5,1\nbob,m2,2,2\n", ["alice", "bob"], ["m1", "m2"], [4.5, 2.0]),
    ("r.csv", "alice,7,4.5\nbob,8,2\n", ["alice", "bob"], [7, 8], [4.5, 2.0]),
    ("r.csv", "1,m1,4.5\n2,m2,2\n", [1, 2], ["m1", "m2"], [4.5, 2.0]),
    ("r.tsv", "alice\tm1\t4.5\nbob\tm2\t2\n", ["alice", "bob"], ["m1", "m2"], [4.5, 2.0]),
    ("r.tsv", "alice m1 4.5\nbob m2 2\n", ["alice", "bob"], ["m1", "m2"], [4.5, 2.0]),
    ("r.csv", "\n\nalice,m1,4.5\n", ["alice"], ["m1"], [4.5]),  # blank lines first
    ("r.csv", "user,item,rating\nalice,m1,4.5\n", ["alice"], ["m1"], [4.5]),
    ("r.csv", "user,item,rating\n1,2,3\n", [1], [2], [3.0]),     # header, numeric body
    ("r.csv", "1,2,rating\n1,2,3\n", [1], [2], [3.0]),           # numeric ids, still a header
    ("r.tsv", "u i r\n5 6 1\n", [5], [6], [1.0]),
])
def test_header_is_told_by_the_rating_field(tmp_path, name, text, users, items, ratings):
    data = load_ratings(write(tmp_path, name, text))
    assert data.users.tolist() == users and data.items.tolist() == items
    assert data.ratings.tolist() == ratings


@pytest.mark.parametrize("line, separator, expected", [
    ("userId,movieId,rating,timestamp", ",", True),
    ("user,item,rating", ",", True),
    ("1,2,rating", ",", True),
    ("alice,m1,4.5,1", ",", False),
    ("alice,1,4.5", ",", False),
    ("1,m1,4.5", ",", False),
    ("1,2,3", ",", False),
    ("u i r", None, True),
    ("alice m1 4", None, False),
    ("a,b", ",", False),  # too few fields: data, for the line parser to report
])
def test_is_header(line, separator, expected):
    from mf_ext.data import _is_header

    assert _is_header(line, separator) is expected


@pytest.mark.parametrize("text, match", [
    ("1\t2\t3\n4\t5\n", r"line 2: expected user<tab>item<tab>rating"),
    ("1\t2\t3\n4\t5\tfive\n", r"line 2: rating 'five' is not a number"),
    ("", r"holds no ratings"),
])
def test_malformed_files(tmp_path, text, match):
    path = write(tmp_path, "u.data", text)
    with pytest.raises(ValueError, match=match):
        load_ratings(path)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"cannot tell the format of .*ratings\.xlsx"):
        load_ratings(str(tmp_path / "ratings.xlsx"))
    with pytest.raises(ValueError, match=r"unknown format 'json'"):
        load_ratings(str(tmp_path / "u.data"), format="json")
    with pytest.raises(ValueError, match=r"cannot read .*nope\.csv"):
        load_ratings(str(tmp_path / "nope.csv"))
    assert guess_format("x/ml-1m/ratings.dat") == "ratings.dat"


def test_as_ratings_inputs():
    data = as_ratings([1, 2], ["a", "b"], [3, 4])
    assert data.ratings.dtype == np.float64
    with pytest.raises(ValueError, match=r"same length, got 2, 2 and 3"):
        as_ratings([1, 2], [1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match=r"ratings must be 1-D"):
        as_ratings([1, 2], [1, 2], [[1, 2]])
    with pytest.raises(TypeError, match="pass users, items and ratings"):
        as_ratings(42)
    scipy_sparse = pytest.importorskip("scipy.sparse")
    coo = scipy_sparse.coo_matrix(([5.0, 1.0], ([0, 2], [1, 0])), shape=(3, 2))
    data = as_ratings(coo.tocsr())
    assert sorted(zip(data.users.tolist(), data.items.tolist(), data.ratings.tolist())) == [
        (0, 1, 5.0), (2, 0, 1.0)]


def test_as_ratings_dataframe():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"userId": [1, 2], "movieId": [7, 8], "rating": [4.0, 3.0], "t": [0, 0]})
    data = as_ratings(frame)
    assert data.items.tolist() == [7, 8] and data.ratings.tolist() == [4.0, 3.0]


def test_id_map_round_trip_and_unknown():
    ids = IdMap(np.array(["b", "a", "c", "a"]))
    idx = ids.index(np.array(["c", "a", "zz"]))
    assert idx.tolist() == [2, 0, -1]
    assert ids.raw(idx[:2]).tolist() == ["c", "a"]
    ints = IdMap(np.array([10, 3, 7]))
    assert ints.index(np.array([7, 4])).tolist() == [1, -1]
    assert ints.index(np.array(["7"])).tolist() == [-1]  # a string is not the integer id 7


def test_splits_are_seeded_and_disjoint():
    data = Ratings(np.arange(100), np.arange(100) % 7, np.ones(100))
    a_train, a_test = train_test_split(data, 0.2, seed=3)
    b_train, b_test = train_test_split(data, 0.2, seed=3)
    assert np.array_equal(a_test.users, b_test.users) and len(a_test) == 20
    assert not set(a_train.users) & set(a_test.users)
    folds = list(kfold(100, 5, seed=1))
    assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(100))
    with pytest.raises(ValueError, match="test_fraction must be in"):
        train_test_split(data, 1.5)


# The numeric fast path (numpy's parser) must read every file it accepts exactly as the
# line-by-line parser does; everything else must fall back to the line-by-line parser.
SEPARATORS = {"u.data": "\t", "ratings.dat": "::", "csv": ",", "tsv": None}


def both_parsers(text, format):
    """(fast path's Ratings or None, line parser's Ratings or the ValueError it raised)."""
    from mf_ext.data import _parse_lines, _parse_numeric

    separator = SEPARATORS[format]
    fast = _parse_numeric(text.encode("ascii"), separator, skip_header=format in ("csv", "tsv"))
    try:
        slow = _parse_lines("f", text, separator, format)
    except ValueError as exc:
        slow = exc
    return fast, slow


def assert_same_ratings(a, b):
    for name in ("users", "items", "ratings"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.parametrize("format, text", [
    ("csv", "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n"),
    ("csv", "\n\n1,2,3\r\n4,5,6.5e-1\r\n\n7,8,-0,9,10\n"),
    ("u.data", "196\t242\t3\t881250949\n186\t302\t3.5\t891717742"),
    ("ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n"),
    ("tsv", "1 2 3\n4\t5  6 77\n"),
])
def test_numeric_files_take_the_fast_path(format, text):
    fast, slow = both_parsers(text, format)
    assert fast is not None and not isinstance(slow, Exception)
    assert_same_ratings(fast, slow)


@pytest.mark.parametrize("format, text", [
    ("csv", "1,2,3\n# comment\n4,5,6\n"),          # comments
    ("csv", "a,2,3\n"),                              # string ids
    ("csv", "1,2,3\n   \n4,5,6\n"),                  # a whitespace-only line
    ("csv", "1,2,3,x\r4,5,6\r"),                     # old Mac line breaks
    ("csv", "0,0,0\r0\n0,0,0\n"),                    # a lone \r cuts the "header" in two
    ("csv", "a,b\x0cc,d\n1,2,3\n"),                   # so does a form feed
    ("csv", "1.0,2,3\n"),                            # "1.0" is kept as a string id
    ("csv", "99999999999999999999,2,3\n"),           # past int64: a string id
    ("ratings.dat", "1\t2::3::4\n"),                 # a tab where "::" separates
    ("u.data", "1\t2\n"),                            # too few fields: the line parser's error
    ("csv", "1,2,nan\n"),                            # letters
    ("csv", ""),
])
def test_other_files_fall_back_to_the_line_parser(format, text):
    fast, _ = both_parsers(text, format)
    assert fast is None


def test_integer_ids_past_int64_become_strings(tmp_path):
    path = write(tmp_path, "r.csv", "99999999999999999999,2,3\n1,2,4\n")
    data = load_ratings(path)
    assert data.users.tolist() == ["99999999999999999999", "1"] and data.items.dtype == np.int64


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402


# Files of well-formed lines (integer ids, float ratings, an optional timestamp) in the format's
# separator, mixed with near misses: "1.0" or "1e3" ids, ids past int64, empty or ':' fields,
# the wrong separator, \r line ends, blank lines, headers.
ints = st.integers(-10**20, 10**20).map(str)
numbers = st.one_of(ints, st.floats(allow_nan=False, allow_infinity=False).map(repr))
noise = st.text(alphabet="0123456789+-.eE: \t", max_size=4)


def file_of(format):
    separator = SEPARATORS[format] or " "
    good = st.tuples(st.integers(-10**6, 10**6), st.integers(0, 10**9), numbers,
                     st.lists(ints, max_size=1)).map(
        lambda t: separator.join([str(t[0]), str(t[1]), t[2]] + t[3]))
    bad = st.tuples(st.lists(st.one_of(numbers, noise), min_size=1, max_size=5),
                    st.sampled_from([",", "\t", "::", " ", " , "])).map(lambda t: t[1].join(t[0]))
    line = st.tuples(st.one_of(good, good, good, bad),
                     st.sampled_from(["\n", "\n", "\r\n", "\r", " \n", "\n\n"]))
    header = st.sampled_from(["", "user,item,rating\n", "u i r\n", "\n"])
    return st.tuples(header, st.lists(line.map("".join), max_size=6)).map(
        lambda t: t[0] + "".join(t[1]))


@given(data=st.data(), format=st.sampled_from(sorted(SEPARATORS)))
def test_fast_path_agrees_with_the_line_parser(data, format):
    text = data.draw(file_of(format))
    fast, slow = both_parsers(text, format)
    if fast is not None:
        assert not isinstance(slow, Exception), f"fast path read {text!r}; line parser: {slow}"
        assert_same_ratings(fast, slow)
