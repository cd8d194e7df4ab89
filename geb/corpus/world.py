"""The invented world: its entities (towns, people, animals, inventions), the answer pools of each
relation, the `Fact` record and `facts(seed)`, which assigns answers to subjects for one seed.

Every name and value is fictional so that no prior knowledge helps a model: whatever it knows about
this world it learned from the built-in corpus. Each entity and value has one English and one Chinese
surface form, used everywhere (names are transliterated once, here), so the two languages always
agree. Answers are unique within a relation, so a question has exactly one right answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# The four kinds double as multiple-choice subjects; `category` follows C-Eval's four categories so
# per-category code paths see two subjects in one category.
SUBJECTS: dict[str, dict[str, str]] = {
    "geography": {"file": "fictional_geography", "en": "fictional geography", "zh": "虚构地理", "category": "Social Science"},
    "people": {"file": "fictional_people", "en": "fictional people", "zh": "虚构人物", "category": "Humanities"},
    "animals": {"file": "fictional_animals", "en": "fictional animals", "zh": "虚构动物", "category": "STEM"},
    "inventions": {"file": "fictional_inventions", "en": "fictional inventions", "zh": "虚构发明", "category": "STEM"},
}

# Subjects of each kind, (English, Chinese). Towns are referred to as "X镇" in Chinese.
TOWNS = [
    ("Varnel", "瓦尔内尔镇"), ("Kestrin", "凯斯特林镇"), ("Lornwick", "洛恩威克镇"), ("Halvard", "哈尔瓦德镇"),
    ("Pellamy", "佩拉米镇"), ("Ostrel", "奥斯特雷尔镇"), ("Brenmoor", "布伦莫尔镇"), ("Quelport", "奎尔波特镇"),
    ("Tarrowby", "塔罗比镇"), ("Minsel", "明塞尔镇"), ("Elvanor", "埃尔瓦诺镇"), ("Corriden", "科里登镇"),
    ("Saltreth", "索尔特雷斯镇"), ("Fennick", "芬尼克镇"), ("Grivmont", "格里夫蒙镇"), ("Zandor", "赞多尔镇"),
    ("Ashbel", "阿什贝尔镇"), ("Lumeria", "卢梅里亚镇"), ("Dravik", "德拉维克镇"), ("Yselle", "伊塞尔镇"),
]
PEOPLE = [
    ("Mira Tolan", "米拉·托兰"), ("Oswin Harrow", "奥斯温·哈罗"), ("Tessa Marlow", "泰莎·马洛"),
    ("Bram Kettering", "布拉姆·凯特林"), ("Ilsa Venn", "伊尔莎·韦恩"), ("Corin Ashby", "科林·阿什比"),
    ("Delphine Rook", "德尔芬·鲁克"), ("Jory Castell", "乔里·卡斯特尔"), ("Nadia Fenwright", "娜迪娅·芬赖特"),
    ("Elric Moss", "埃尔里克·莫斯"), ("Sabine Quarry", "萨宾·夸里"), ("Tobin Wale", "托宾·韦尔"),
    ("Lysa Gorran", "莉莎·戈兰"), ("Hugo Pellin", "雨果·佩林"), ("Anwen Sollis", "安雯·索利斯"),
    ("Piers Calloway", "皮尔斯·卡洛韦"), ("Greta Holm", "格蕾塔·霍尔姆"), ("Finn Durnam", "芬恩·德纳姆"),
    ("Rowan Teague", "罗恩·蒂格"), ("Vera Lind", "薇拉·林德"),
]
# English animal and invention names are common nouns: templates write "the {s}".
ANIMALS = [
    ("glimmerfox", "闪光狐"), ("cloudfin", "云鳍鱼"), ("thornbeak", "刺喙鸟"), ("mossback turtle", "苔背龟"),
    ("ember newt", "火纹蝾螈"), ("velvet owl", "丝绒猫头鹰"), ("dusk moth", "暮色蛾"), ("river wolf", "河狼"),
    ("crystal frog", "水晶蛙"), ("sunstripe deer", "日纹鹿"), ("bell crane", "铃鹤"), ("mud otter", "泥獭"),
    ("frost hare", "霜兔"), ("pebble crab", "卵石蟹"), ("silk goat", "丝毛羊"), ("echo bat", "回声蝠"),
    ("marsh lynx", "沼泽猞猁"), ("bramble boar", "荆棘野猪"), ("star lizard", "星斑蜥"), ("cinder hawk", "烬鹰"),
]
INVENTIONS = [
    ("cloud loom", "云织机"), ("whisper lamp", "低语灯"), ("rain clock", "雨钟"), ("storm compass", "风暴罗盘"),
    ("singing kettle", "歌唱壶"), ("sun press", "日光压机"), ("root engine", "根须引擎"), ("tide wheel", "潮汐轮"),
    ("salt mirror", "盐镜"), ("dew pump", "露水泵"), ("spindle sled", "纺锤雪橇"), ("cold oven", "冷炉"),
    ("mist bottle", "雾瓶"), ("moon ladder", "月梯"), ("lumen quill", "流明羽笔"), ("bronze radio", "青铜收音机"),
    ("thunder drum", "雷鼓"), ("gear basket", "齿轮篮"), ("feather scale", "羽毛秤"), ("spark sieve", "火花筛"),
]

# Answer pools (a few more values than subjects, so each seed also leaves unused distractors).
PRODUCTS = [
    ("glass lanterns", "玻璃灯笼"), ("copper bells", "铜铃"), ("wool blankets", "羊毛毯"), ("honey cakes", "蜂蜜饼"),
    ("paper kites", "纸风筝"), ("silver spoons", "银勺"), ("salted fish", "咸鱼"), ("wooden toys", "木制玩具"),
    ("straw hats", "草帽"), ("rose soap", "玫瑰香皂"), ("iron pots", "铁锅"), ("plum wine", "梅子酒"),
    ("pear jam", "梨子酱"), ("music boxes", "八音盒"), ("linen shirts", "亚麻衬衫"), ("clay whistles", "陶哨"),
    ("cherry pies", "樱桃派"), ("maple syrup", "枫糖浆"), ("leather boots", "皮靴"), ("painted fans", "彩绘扇子"),
    ("goat cheese", "山羊奶酪"), ("scented candles", "香薰蜡烛"), ("marble statues", "大理石雕像"),
    ("silk carpets", "丝绸地毯"),
]
RIVERS = [
    ("Oren River", "奥伦河"), ("Sable River", "塞布尔河"), ("Mirrow River", "米罗河"), ("Caldin River", "卡尔丁河"),
    ("Ysra River", "伊斯拉河"), ("Brannoch River", "布兰诺克河"), ("Silvan River", "西尔万河"),
    ("Ardel River", "阿德尔河"), ("Tovin River", "托文河"), ("Lissom River", "利索姆河"), ("Wendel River", "温德尔河"),
    ("Norrow River", "诺罗河"), ("Emmet River", "埃米特河"), ("Kael River", "凯尔河"), ("Rusk River", "拉斯克河"),
    ("Dorran River", "多兰河"), ("Vey River", "维伊河"), ("Harlin River", "哈林河"), ("Sorrel River", "索雷尔河"),
    ("Ulden River", "乌尔登河"), ("Gavra River", "加夫拉河"), ("Ilven River", "伊尔文河"), ("Mardon River", "马尔顿河"),
    ("Faelin River", "费林河"),
]
JOBS = [
    ("clockmaker", "钟表匠"), ("beekeeper", "养蜂人"), ("sailor", "水手"), ("painter", "画家"),
    ("astronomer", "天文学家"), ("baker", "面包师"), ("poet", "诗人"), ("gardener", "园丁"),
    ("blacksmith", "铁匠"), ("mapmaker", "地图绘制师"), ("violinist", "小提琴手"), ("potter", "陶艺师"),
    ("weaver", "织布工"), ("shepherd", "牧羊人"), ("librarian", "图书管理员"), ("glassblower", "吹玻璃匠"),
    ("doctor", "医生"), ("carpenter", "木匠"), ("fisherman", "渔夫"), ("tailor", "裁缝"),
    ("architect", "建筑师"), ("dancer", "舞蹈家"), ("chemist", "化学家"), ("lighthouse keeper", "灯塔看守人"),
]
FOODS = [
    ("wild berries", "野莓"), ("river snails", "河螺"), ("pine seeds", "松子"), ("small crabs", "小螃蟹"),
    ("mushrooms", "蘑菇"), ("clover", "三叶草"), ("moths", "飞蛾"), ("acorns", "橡子"), ("seaweed", "海藻"),
    ("rice grains", "稻谷"), ("grasshoppers", "蚱蜢"), ("tree bark", "树皮"), ("lotus roots", "莲藕"),
    ("plums", "李子"), ("water lilies", "睡莲"), ("earthworms", "蚯蚓"), ("dandelions", "蒲公英"),
    ("shrimp", "小虾"), ("bamboo shoots", "竹笋"), ("figs", "无花果"), ("sunflower seeds", "葵花籽"),
    ("chestnuts", "栗子"), ("tadpoles", "蝌蚪"), ("carrots", "胡萝卜"),
]
HABITATS = [
    ("bamboo groves", "竹林"), ("salt marshes", "盐沼"), ("desert caves", "沙漠洞穴"), ("mountain lakes", "高山湖泊"),
    ("pine forests", "松林"), ("coral reefs", "珊瑚礁"), ("rice fields", "稻田"), ("old castles", "古堡"),
    ("river banks", "河岸"), ("grasslands", "草原"), ("volcanic islands", "火山岛"), ("mangrove swamps", "红树林"),
    ("ice caves", "冰洞"), ("apple orchards", "苹果园"), ("sand dunes", "沙丘"), ("city rooftops", "城市屋顶"),
    ("deep valleys", "深谷"), ("sea cliffs", "海边悬崖"), ("tea gardens", "茶园"), ("birch woods", "白桦林"),
    ("lotus ponds", "荷塘"), ("cedar forests", "雪松林"), ("hot springs", "温泉"), ("wheat fields", "麦田"),
]
USES = [
    ("catching rain", "收集雨水"), ("measuring wind", "测量风速"), ("drying fruit", "晾干水果"),
    ("sorting seeds", "分拣种子"), ("finding lost keys", "寻找钥匙"), ("calming babies", "安抚婴儿"),
    ("warming bread", "加热面包"), ("cleaning windows", "清洁窗户"), ("mending nets", "修补渔网"),
    ("counting stars", "数星星"), ("cooling milk", "冷却牛奶"), ("spinning wool", "纺羊毛"),
    ("waking farmers", "叫醒农夫"), ("carrying water", "运水"), ("lighting tunnels", "照亮隧道"),
    ("predicting storms", "预报风暴"), ("grinding spices", "研磨香料"), ("teaching parrots", "教鹦鹉说话"),
    ("melting snow", "融化积雪"), ("pressing flowers", "压制花朵"), ("polishing shoes", "擦亮皮鞋"),
    ("sending letters", "寄送信件"), ("tuning pianos", "调钢琴"), ("painting fences", "粉刷篱笆"),
]

KIND_SUBJECTS = {"geography": TOWNS, "people": PEOPLE, "animals": ANIMALS, "inventions": INVENTIONS}

# relation → (kind of its subject, answer pool). Two relations per kind; hometown and inventor link
# the kinds (a person's hometown is one of the towns, an invention's inventor one of the people).
RELATIONS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "famous_for": ("geography", PRODUCTS),
    "river": ("geography", RIVERS),
    "profession": ("people", JOBS),
    "hometown": ("people", TOWNS),
    "diet": ("animals", FOODS),
    "habitat": ("animals", HABITATS),
    "inventor": ("inventions", PEOPLE),
    "purpose": ("inventions", USES),
}


@dataclass(frozen=True)
class Fact:
    """One fact of the invented world in both languages.

    `kind` is the subject's kind (and MCQ subject), `relation` what is said about it. Answers are
    short (1-4 English words, 2-6 Chinese characters); distractors are three other values of the
    same relation, aligned across languages (distractors_zh[i] translates distractors_en[i]).
    `statement_en`/`statement_zh` are canonical one-sentence statements (training phrasing).
    """

    id: str
    kind: str
    relation: str
    subject_en: str
    subject_zh: str
    answer_en: str
    answer_zh: str
    distractors_en: tuple[str, str, str]
    distractors_zh: tuple[str, str, str]
    statement_en: str = ""
    statement_zh: str = ""

    def answer(self, lang: str) -> str:
        return self.answer_zh if lang == "zh" else self.answer_en

    def subject(self, lang: str) -> str:
        return self.subject_zh if lang == "zh" else self.subject_en

    def distractors(self, lang: str) -> tuple[str, str, str]:
        return self.distractors_zh if lang == "zh" else self.distractors_en


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_")


def facts(seed: int = 0) -> list[Fact]:
    """All facts of the world for `seed` (160: 4 kinds × 20 subjects × 2 relations), in a fixed order.

    The seed decides which answer each subject gets and which distractors each fact shows; names and
    pools never change. The same seed always gives the same world.
    """
    from geb.corpus.templates import render, STATEMENTS

    rng = random.Random(f"geb-corpus:{seed}:facts")
    out: list[Fact] = []
    for relation, (kind, pool) in RELATIONS.items():
        subjects = KIND_SUBJECTS[kind]
        values = rng.sample(pool, len(subjects))
        for (s_en, s_zh), (a_en, a_zh) in zip(subjects, values):
            others = [v for v in pool if v[0] != a_en]
            picked = rng.sample(others, 3)
            f = Fact(
                id=f"{_slug(s_en)}.{relation}", kind=kind, relation=relation,
                subject_en=s_en, subject_zh=s_zh, answer_en=a_en, answer_zh=a_zh,
                distractors_en=tuple(p[0] for p in picked), distractors_zh=tuple(p[1] for p in picked),
            )
            out.append(Fact(**{**f.__dict__,
                               "statement_en": render(STATEMENTS[relation]["en"]["train"][0], f, "en"),
                               "statement_zh": render(STATEMENTS[relation]["zh"]["train"][0], f, "zh")}))
    return out
