"""Generate the project's own small sample data set (synthetic, written for this project; not the DLS data).

Same format as the DLS competition files: id column ``index``, ``assessment`` (0-6), ``tags`` (a set literal),
``text`` and 0/1 label columns ``trend_id_res0`` .. ``trend_id_res19``; class 19 means "no meaning", like the
fallback class of the reference solution. Deterministic:  python data/make_sample.py
"""

from pathlib import Path

import numpy as np
import pandas as pd

CLASSES = [
    ("Долгая доставка", ["долго везли заказ", "курьер опоздал на час", "доставка идёт слишком долго"]),
    ("Высокие цены", ["цены выше чем в магазине", "всё очень дорого", "дорогие продукты"]),
    ("Мало акций", ["нет нормальных скидок", "акций стало меньше", "хочу больше промокодов"]),
    ("Беден ассортимент", ["маленький выбор товаров", "нет нужных продуктов", "ассортимент скудный"]),
    ("Испорченные продукты", ["привезли испорченное молоко", "фрукты были гнилые", "хлеб с плесенью"]),
    ("Вежливый курьер", ["курьер очень вежливый", "спасибо курьеру за помощь", "приятный курьер"]),
    ("Быстрая доставка", ["привезли очень быстро", "доставка за [NUM] минут", "быстро и удобно"]),
    ("Неудобное приложение", ["приложение часто зависает", "неудобный поиск в каталоге", "сложно найти товар"]),
    ("Не привезли товар", ["не привезли часть заказа", "одного товара не хватало", "забыли положить пакет"]),
    ("Замены товаров", ["заменили товар без спроса", "странные замены", "положили другой товар"]),
    ("Поддержка не помогла", ["поддержка не отвечает", "чат поддержки бесполезен", "деньги не вернули"]),
    ("Минимальная сумма", ["большая минимальная сумма заказа", "снизьте минимальный заказ", "дорогой порог"]),
    ("Платная доставка", ["доставка стала платной", "дорогая доставка", "верните бесплатную доставку"]),
    ("Хорошее качество", ["продукты свежие", "всё качественное", "отличное качество товаров"]),
    ("Упаковка", ["помятая упаковка", "пакеты порвались", "яйца разбились в дороге"]),
    ("Оплата", ["не проходит оплата картой", "списали деньги дважды", "проблемы с оплатой"]),
    ("Зона доставки", ["не доставляют в мой район", "расширьте зону доставки", "нет доставки за город"]),
    ("Всё нравится", ["всё отлично", "пользуюсь давно, всё устраивает", "лучший сервис 👍"]),
    ("Бонусы", ["бонусы сгорают", "мало баллов за покупки", "непонятная бонусная программа"]),
    ("Нет смысла", ["ок", "-", "нормально", ""]),
]
TAGS = ["DELIVERY", "PRICE", "PROMOTIONS", "ASSORTMENT", "PRODUCTS_QUALITY", "SUPPORT", "CATALOG_NAVIGATION"]


def make(n: int, seed: int, labelled: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    freq = np.linspace(3.0, 0.5, len(CLASSES) - 1)
    freq /= freq.sum()
    rows = []
    for i in range(n):
        if rng.random() < 0.06:
            classes = [19]
        else:
            k = rng.choice([1, 1, 1, 2, 2, 3])
            classes = sorted(rng.choice(len(CLASSES) - 1, size=k, replace=False, p=freq).tolist())
        parts = [str(rng.choice(CLASSES[c][1])) for c in classes]
        text = ", ".join(p for p in parts if p)
        text = text[:1].upper() + text[1:]
        tags = sorted(rng.choice(TAGS, size=rng.integers(0, 4), replace=False).tolist())
        row = {"index": 1000 + seed * 10000 + i, "assessment": float(rng.integers(0, 7)),
               "tags": "{" + ",".join(tags) + "}" if tags else np.nan, "text": text}
        if labelled:
            row.update({f"trend_id_res{c}": int(c in classes) for c in range(len(CLASSES))})
        rows.append(row)
    return pd.DataFrame(rows)


if __name__ == "__main__":
    here = Path(__file__).parent
    make(400, 1, True).to_csv(here / "sample_train.csv", index=False)
    make(100, 2, False).to_csv(here / "sample_test.csv", index=False)
    pd.DataFrame({"trend_id": range(len(CLASSES)), "trend": [c[0] for c in CLASSES]}).to_csv(
        here / "sample_trends.csv", index=False)
    print("wrote data/sample_train.csv (400 rows), data/sample_test.csv (100), data/sample_trends.csv")
