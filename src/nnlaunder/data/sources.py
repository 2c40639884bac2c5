"""Where the datasets come from: canonical public URLs (the ones torchvision and Keras use, with a
mirror where the primary is known to be flaky) and pinned SHA-256 checksums of every file."""

from __future__ import annotations

from dataclasses import dataclass

ADI_COMMIT = "448bf51384dc29f779325323ac1041b59e099bc5"     # adiyoss/WatermarkNN, data/trigger_set/
_ADI_RAW = f"https://raw.githubusercontent.com/adiyoss/WatermarkNN/{ADI_COMMIT}"


@dataclass(frozen=True)
class Remote:
    """One file: its path under the dataset's folder, the URLs to try in order, its SHA-256, and
    whether it is an archive unpacked into the folder (then removed)."""
    name: str
    urls: tuple[str, ...]
    sha256: str
    size: int | None = None
    unpack: bool = False


@dataclass(frozen=True)
class Source:
    folder: str                  # under the data folder
    files: tuple[Remote, ...]
    present: tuple[str, ...]     # the files the readers need, relative to the folder
    licence: str
    fallback: str | None = None  # a system folder the reader also takes (a distribution's package)


def _idx(bases: tuple[str, ...], pins: dict[str, tuple[str, int]]) -> tuple[Remote, ...]:
    return tuple(Remote(n, tuple(b + n for b in bases), sha, size) for n, (sha, size) in pins.items())


MNIST = Source("mnist", _idx(
    ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    {"train-images-idx3-ubyte.gz": ("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9912422),
     "train-labels-idx1-ubyte.gz": ("3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881),
     "t10k-images-idx3-ubyte.gz": ("8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877),
     "t10k-labels-idx1-ubyte.gz": ("f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542)}),
    ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
     "t10k-labels-idx1-ubyte.gz"),
    "Yann LeCun and Corinna Cortes; see http://yann.lecun.com/exdb/mnist/")

FASHION_MNIST = Source("fashion-mnist", _idx(
    ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
     "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
    {"train-images-idx3-ubyte.gz": ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", 26421880),
     "train-labels-idx1-ubyte.gz": ("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", 29515),
     "t10k-images-idx3-ubyte.gz": ("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", 4422102),
     "t10k-labels-idx1-ubyte.gz": ("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", 5148)}),
    MNIST.present, "MIT, Zalando Research", fallback="/usr/share/datasets/fashion-mnist")

CIFAR10 = Source("cifar10", (
    Remote("cifar-10-python.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
           "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", 170498071, unpack=True),),
    tuple(f"cifar-10-batches-py/{n}" for n in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                                              "data_batch_5", "test_batch", "batches.meta")),
    "Alex Krizhevsky; see https://www.cs.toronto.edu/~kriz/cifar.html")

_ADI_PINS = {
    "LICENSE": "59eed5aff8fe2e10ede12c836a3b1161e3ed1b26c6335929b1133238a3201180",
    "labels-cifar.txt": "4fc543eb30da90814c6ab6c6808c1a0eafc936518ad4d9a8f11eb1c288f79638",
    "pics/1.jpg": "3acb63cb2e1492fb7da6d0a9e529ca04b26a475c4402a98747da07f78b2249ab",
    "pics/2.jpg": "a57e4ef0057bea70f602fd0f68b00d973b89a5c99ea65e1c9c07b9e47a3c6c7a",
    "pics/3.jpg": "efc38aa06091410cfb2edc1feba5db3183209441739df6e76dc6184c0fcc53d4",
    "pics/4.jpg": "5e26db0ee46facdfa7a60e153693028b8834312d7b509e71a4aaa2828df37c8b",
    "pics/5.jpg": "5bb5e1a70ab2b267491e62d949c9d7f2dbac58542f4c33f6bbc9d1c577c751aa",
    "pics/6.jpg": "1670d02e36c759583e0ef9023fe7f8cab4c4d9352daec3100fe6341b7b3e41cc",
    "pics/7.jpg": "710277fdc33f0f6df01c05aeffc873bde00ed33cdfed19242196a58660f44e9f",
    "pics/8.jpg": "888e73b03a5fae6cbb2993d7f93ce1d28ca0915d77836244bddbcd3f1ff0e43e",
    "pics/9.jpg": "5e80113e958539b6287108e7e9029f2d0c83ad0db39aa262ca0875c7927a4503",
    "pics/10.jpg": "fedc701b1ab262dc8447ac6d195f521c679d66c001f8df4d8ad97e6ec9a910e1",
    "pics/11.jpg": "de053e1a0637724a610e536af8245dbf7c2ffebef1f77f52743b49e40467ff7f",
    "pics/12.jpg": "8f5115e9ae09ff26109f99b1db065bc96bc7bd66e84cee11f526c1a767efa794",
    "pics/13.jpg": "151f6127ac0ff86229c5845b51e6f8f19b1262ebccb87ddb98e584dceb81497c",
    "pics/14.jpg": "d97fdc4a563c72ccbbc8862dfb35aba4d9a4c3ebb0eaeb849a9512e05111e270",
    "pics/15.jpg": "6a07b593208e12c1fe63edee68f2e659f37eb56bddf87f3c1e5c6c9a6ce87993",
    "pics/16.jpg": "fe1ae52ae2758482667d75ad9bbcc18fb13575a706b7f2f8df9251991fb0c1a0",
    "pics/17.jpg": "67786a28a70ef7838d102865958c4efea67c6c346b53dd1a9121bfce174c8fab",
    "pics/18.jpg": "5a0e5c0f9735c65451b513749f711ffd35f075c6ea4a398a4673e71437c6f74a",
    "pics/19.jpg": "8e18369d76c6cb9b350771fc5bdd184de6f2ad598919ae76e4bb1a256b0823b3",
    "pics/20.jpg": "714fb626b81ac6c9d334feb6d7e2cf2df3dbb246b82eabb9a81acd8dc5616ba5",
    "pics/21.jpg": "637cea8e5ab0ca3f4bc499c9eef85c46a1bf9423f80006aacbd835abb5ef9474",
    "pics/22.jpg": "f48a7acf5f6424de5025b8a097170963dddd29d4b992a1f09fdb79c8ede48689",
    "pics/23.jpg": "201fe5dbf75e1aec8a37c6cd94234ddaa2739452dd54eff7f94bfe496984b060",
    "pics/24.jpg": "648f8ffcfcf6e88c838892e02a599a8f064af4b71736a1f8c34fa81e8b2af582",
    "pics/25.jpg": "3dedd3f4614aebf8c1864ff552b3d5a205c182615d7b1576da98cb5dad2747a9",
    "pics/26.jpg": "0d838f7da5ed58d8c188ba72db2a45d26fa10040082a26ac53fea4aefe953940",
    "pics/27.jpg": "0fe7307ea7efb5d468c0c94f99a4f6ce719a065776681bf7d2d6e4790334b404",
    "pics/28.jpg": "f7abf8df1e03f43ead091fd70c361bd2d422149308fba3a35a0342546d6e2290",
    "pics/29.jpg": "91e778916569c5a0138258bb3e9a89269569385107212fc2d49af0c66793a1fe",
    "pics/30.jpg": "ba02a5076fe809014094ff3a2d9665459203d4cda4e8990a32dd0a66426563c2",
    "pics/31.jpg": "7a7ad59220192a6e2e0490dd1a8afb71204789107430a13c5faa9c7f33738155",
    "pics/32.jpg": "7cf30d9d4da5639c41e9739cce7047149b0a4ce95a5a51ac977d275d3ac8fb6b",
    "pics/33.jpg": "fcf8ab8f736f1c576696a959aefd4007181e56df949b0fb3cea1ddc7e3c99891",
    "pics/34.jpg": "17991b0e9ee78210a87d26f8e9dbbf973c06713bcdc024e7630d7a74ebada966",
    "pics/35.jpg": "e819719c07c8466ac882c85f3db3ba1b84b0cae58aea625fe501cf58d3dcba50",
    "pics/36.jpg": "338205a2cb4195317530fcc6fb2a659fa1a02eb155557755c4ef0860c00c4d95",
    "pics/37.jpg": "c2ccd60cc311f57446eeb457340f3346b81a5f3b51b4d5cb1c054ee336ef1285",
    "pics/38.jpg": "b6e9627ba7a127e4614870d93ca40039256c336e1f9d5fc724b3591c6a16da0f",
    "pics/39.jpg": "c97bba240c8e13ad0d67af0693e56444ee4c8418ef4f72864aa0f8ced50b2874",
    "pics/40.jpg": "c5fb00c1f654e59d2a2b9e2026894d8cf3aece89e3b6056340443454e029a795",
    "pics/41.jpg": "66409f405fac4d2af8ad09befaaa26945ee1632fbf6533b9124ef9eb4d78a6bb",
    "pics/42.jpg": "7d0c390d3fe9645ac92341280c9568b44df75be1c0b506d6643476ea35569b70",
    "pics/43.jpg": "b3a0046d0e127782956cb3fe9a00ace9709b6d4dc8bc7047c666daed4290eb3f",
    "pics/44.jpg": "0de3ec05423d51045a70b1314ca24251efaf4888667244dbd97471ef36610127",
    "pics/45.jpg": "2fde0405050529a2b8d535089140496c1c6e0f9711330d0d6d1729fa30585160",
    "pics/46.jpg": "aa70af2c2ff4fa63dd65d0095474b5047a4c001bcebabed946e325a6afbd58fb",
    "pics/47.jpg": "27c0ec4ed4ac427a2ef6eaff037d5566e4f56c90703e36996c3a07df4c39d0a6",
    "pics/48.jpg": "27441aba091fe620c01d5f9b05a81d02b0e8f679d00c42533df6a1efa06f5df2",
    "pics/49.jpg": "81eba12767a1d35da7ed9c9d951352d78329d4d31199c905a5d630704cb285b1",
    "pics/50.jpg": "f96dad5f81fad6b5e43c7b0e1ebba1870b8847cb0e2920af9d8cdf6fa1b442a9",
    "pics/51.jpg": "96b5f88f5ea53334f60753aaa37065b639db599e1b9a50b5bd5e08ba4741928f",
    "pics/52.jpg": "b63bd248c66198e0b31adfa7139006f02b422217e255d796d577eb5871eb0231",
    "pics/53.jpg": "1326c646987e60ccc0e15c88cd4cc43774b2627ccc250b106fe61bca5239c836",
    "pics/54.jpg": "f6c4b8ffcd8d82a889e778b747b455411c27ad801f91c95a716aa76b9026bab7",
    "pics/55.jpg": "01db46124c7a5f0e7c7c024427e02d9353e735b6971f2c3669738739c0e8fbaf",
    "pics/56.jpg": "8a2de25e95a605b31cc832094df6f3f25801cb701ce81fec617d6dbf41d087e2",
    "pics/57.jpg": "f40fc7456e93de72b502e788c8c0f2d30db8dbcca9e5d54fe38d1082f477ace2",
    "pics/58.jpg": "203df68395754e3a40d5501fcc9cca618e766e10de1c3d4ecc60e02a65661b34",
    "pics/59.jpg": "7df93323a427c120e19a1494417675d2b6dc5019f3e1d480f45921ebfe06763b",
    "pics/60.jpg": "df927714122e01d391c5710aa7c6945b499c5ec96656c79da68d428c4d39bd4e",
    "pics/61.jpg": "6d9880d0442ed2230c5f45e2c90adae789bca11c7a7066c3c1ddd17b31b0ccf9",
    "pics/62.jpg": "43a1df1b0b6cfcd0bfcd9e943d293ee879990c05205cdcfeb42aac9285e45e03",
    "pics/63.jpg": "c1fcafeb78ffa1a01929beb25e1d6a8c9b216249058aba8712f51cef2551a3e4",
    "pics/64.jpg": "bcf49249ac1024ffee6da48129229f74a38db5ea86d2f477f88ef37c60e03177",
    "pics/65.jpg": "4d1bbb582ccf1d9cbdd898b56f57b04ce9c3d6e4109922883a87737a02bc5c91",
    "pics/66.jpg": "7371af42c2a93e001c36480ad9010eb23a4379bfe084592010bddb8851e01744",
    "pics/67.jpg": "5b9e6d658e1787c377b5312f740e0de871773c4bf9ae941e201c89baddc257ce",
    "pics/68.jpg": "86c84924c014921d1cf3a4f40bd7268ddc1a90967e9692bea0f9e70e79ba72ee",
    "pics/69.jpg": "5229cefe175641eae2d20630e36cc0555f5288c505cc51dbb9e8248123aac781",
    "pics/70.jpg": "18cbc8947bb2b05bdcf7c4d116e380cddae3ce6b87047c6b50d7a0e2e9dfb0ac",
    "pics/71.jpg": "5d93cd130d9d61a03f45f197cd593709e53210a54e2aecc0fe83caaf893dd01e",
    "pics/72.jpg": "1af356b1f0029f5fd1cf0575d316575cf73c110365dd3311512233862bfcc032",
    "pics/73.jpg": "4a1ccfa7f9f5b7fdf6f9a133d7316c427feaadec18a9832335819b2092a13776",
    "pics/74.jpg": "bd26b1dcb5c59601fb610b90ebb7ac0d1f4e9b55c0f8a754a91da00a4efe7374",
    "pics/75.jpg": "cbda99dbaa7f7ff52d9573b19ae1a17050cf969f28e07fb2dd0f92a23dc827c1",
    "pics/76.jpg": "e4fb024597e3ba537dcaab9d6b115504110078f0dd6f54c8eea6f7fe8d032dc8",
    "pics/77.jpg": "e39e6a373f04c7f9b10aaf98279e4af4409ba565f73d3a0a9ae3e03d7604b826",
    "pics/78.jpg": "252f5c82e9f227664180041a3d6bd74030546df6959787b80b53c5088dbb6ebc",
    "pics/79.jpg": "0dd9522456498958fef7c0dc81ae56739823511538dd79bd5fb844a2ec85dd35",
    "pics/80.jpg": "dde550572589bfcf4b67486bee609b5e87209239250c256ff804e93e8a2feee0",
    "pics/81.jpg": "b1cb729477163035ef9842518c41a47f1917ca6a64918b88b8c36688772a4a41",
    "pics/82.jpg": "dfddee95f72dd7081f5ae36175911bbf53747b0b01dd9eb9a57d6d02e755d15a",
    "pics/83.jpg": "caad32660c8ba83d02603aef730c19a4d4e261d27cc05e35093595b00bedce23",
    "pics/84.jpg": "f4201d7400076bb2d4711e7a278fa02965c572e0ddd88c75c86d5afefb3a8582",
    "pics/85.jpg": "bb4fb0c49cf4374cdac3560b0e5c2375b584e5de728a42bb187d210a434745ba",
    "pics/86.jpg": "6120959c46a1414a258ef8aae10cd4b2eab9ef8efa13928e42a725b31adbee07",
    "pics/87.jpg": "0747e88569db4c49d97d33d28aefcf20b81bd709e25235c399a43444f730486f",
    "pics/88.jpg": "a4ae0f86d34ecb76f3774b40eecfc0a9060c4d0a2621d3be7038b2bacfdb9e94",
    "pics/89.jpg": "ad4325ca981d15bb4edae61a6a185183fb51c000d1837f1a7acf6d97509d0e9e",
    "pics/90.jpg": "54554fe7ae48f626e7ed928d9e254b3298720bdbdedd5da4926601bf72f14458",
    "pics/91.jpg": "2200ea95ba49b33351ffdc947d80a1a264c4de58f1cd2a2a3673e1cc68f475c8",
    "pics/92.jpg": "64662a32983939ca6c7adb3cced1f991627c6934a25e3f5d8326416aaa2c9806",
    "pics/93.jpg": "9e4e2cd33f5a7a350a9b791d5981e7eb3ba48760b870fcec9442b0f87f4d2cc3",
    "pics/94.jpg": "4c95b89823dda6d1efe501a0483aa3c0040d65d278d075685eaff532b4a5d919",
    "pics/95.jpg": "05fd137e2821de168a267678a05cf1391a00663128b955fec493d5524cd679c9",
    "pics/96.jpg": "f0694208a2f6df06e6ed938476b27916f654f255f9168f7ffb0b093b6ebb1b0f",
    "pics/97.jpg": "838b3eaa01f9930fbff0fece8461c5426a5872731bd301143dd032d62a7750fa",
    "pics/98.jpg": "1d534b8c97e19f696ec6998612f9fb86dbd9ab3b15f0b3507caa2a19c012eaed",
    "pics/99.jpg": "74e1bab9ac021d06c9ecf61313f253c466539803e9690f3ef4a499e62ab81975",
    "pics/100.jpg": "3c056e1bac6559043875d624486172181d6bbabfd1e9be7822c5ba107b74c8d2",
}
ADI_TRIGGER_SET = Source("adi-trigger-set", tuple(
    Remote(n, (f"{_ADI_RAW}/{'LICENSE' if n == 'LICENSE' else 'data/trigger_set/' + n}",), sha)
    for n, sha in _ADI_PINS.items()), tuple(_ADI_PINS), "MIT, Yossi Adi (LICENSE, fetched beside the images)")

SOURCES: dict[str, Source] = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST, "cifar10": CIFAR10,
                              "adi-trigger-set": ADI_TRIGGER_SET}
